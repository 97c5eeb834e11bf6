"""Imported by the grading pool's forkserver only: it warms Math-Verify there once, so every worker forks warm,
and imports the parent's main script there (see ``redi.gradepool._context``) so workers need not re-import it.

Not for import elsewhere: importing it runs :func:`redi.gradepool.warm` (~0.5 s).
"""

import os
from multiprocessing import process, spawn

from .gradepool import warm

_main = os.environ.get("REDI_FORKSERVER_MAIN")
if _main and os.path.exists(_main):
    process.current_process()._inheriting = True  # as multiprocessing.forkserver does for its own __main__ preload
    try:
        spawn.import_main_path(_main)
    except Exception:  # noqa: BLE001 - workers then import it themselves, as multiprocessing would anyway
        pass
    finally:
        del process.current_process()._inheriting
warm()
