"""Imported by the grading pool's forkserver only: it warms Math-Verify there once, so every worker forks warm,
and imports the parent's main script there (see ``redi.gradeworker.start_context``) so workers need not re-import it.

Not for import elsewhere: importing it runs :func:`redi.gradeworker.warm` (~0.5 s).
"""

import os
from multiprocessing import process, spawn

from .gradeworker import warm

_main = os.environ.get("REDI_FORKSERVER_MAIN")
if _main and not os.path.exists(_main):
    # `python - < script` or an embedded interpreter: there is nothing to import, but workers would try to
    # (and die: FileNotFoundError '<stdin>'). A stand-in main with that __file__ tells them it is done.
    import sys
    import types

    _stand_in = types.ModuleType("__mp_main__")
    _stand_in.__file__ = _main
    sys.modules["__main__"] = sys.modules["__mp_main__"] = _stand_in
elif _main:
    process.current_process()._inheriting = True  # as multiprocessing.forkserver does for its own __main__ preload
    try:
        spawn.import_main_path(_main)
    except BaseException:  # noqa: BLE001 - even a SystemExit of an unguarded script must not kill the forkserver;
        pass  # workers then import the script themselves, as multiprocessing would anyway
    finally:
        del process.current_process()._inheriting
warm()
