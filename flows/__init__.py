"""Prefect flows over the REDI library: ``redi-pipeline``, ``redi-stage``, ``nightly-eval``, ``redi-eval``."""
