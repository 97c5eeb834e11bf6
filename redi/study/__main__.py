"""``python -m redi.study deployments/study-cpu [--set k=v ...]``: the study without Prefect."""

from .runner import main

if __name__ == "__main__":
    raise SystemExit(main())
