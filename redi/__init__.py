"""REDI: Reinforcement Distillation pipeline library (never imports Prefect)."""
__version__ = "0.1.0"
