"""Shared test set-up: offline Hugging Face, a session-wide PREFECT_HOME in a temp folder, a tiny recipe.

Fixtures of the orchestration layer live in tests/conftest_orchestration.py (loaded below).
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # busy 2-core machines
# Prefect reads PREFECT_HOME when first imported: set it before any test module imports prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="redi-test-prefect-"))
# Content fingerprints of local inputs (redi.fingerprint) are cached per session, not in the user's ~/.cache.
os.environ.setdefault("REDI_FINGERPRINT_CACHE", os.path.join(tempfile.mkdtemp(prefix="redi-test-fp-"), "sha256.json"))

pytest_plugins = ["conftest_orchestration"]  # tests/ is on sys.path (rootdir conftest, prepend mode)
