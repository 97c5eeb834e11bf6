"""Typed, strict configs: one section per stage, defaults < YAML < overrides."""

from .base import StrictModel
from .data import DataConfig, SynthConfig
from .evaluate import OPENR1_SUFFIX, EvaluateConfig
from .model import ModelConfig, TinyModelConfig
from .recipe import STAGES, Recipe, RecipeError, RunConfig, apply_overrides, load_recipe, recipe_to_yaml
from .train import OptimConfig, SFTConfig, Stage2Config
from .verify import VerifyConfig

__all__ = [
    "StrictModel", "DataConfig", "SynthConfig", "EvaluateConfig", "OPENR1_SUFFIX", "ModelConfig",
    "TinyModelConfig", "STAGES", "Recipe", "RecipeError", "RunConfig", "apply_overrides", "load_recipe",
    "recipe_to_yaml", "OptimConfig", "SFTConfig", "Stage2Config", "VerifyConfig",
]
