"""Typed, strict configs: one section per stage, defaults < YAML < overrides."""

from .base import StrictModel
from .data import DataConfig, SynthConfig
from .evaluate import EvaluateConfig
from .model import ModelConfig, TinyModelConfig
from .prompt import PromptConfig
from .recipe import STAGES, Recipe, RecipeError, RunConfig, apply_overrides, load_recipe, recipe_to_yaml
from .train import OptimConfig, SFTConfig, Stage2Config
from .verify import VerifyConfig

__all__ = [
    "StrictModel", "DataConfig", "SynthConfig", "EvaluateConfig", "ModelConfig",
    "TinyModelConfig", "PromptConfig", "STAGES", "Recipe", "RecipeError", "RunConfig", "apply_overrides", "load_recipe",
    "recipe_to_yaml", "OptimConfig", "SFTConfig", "Stage2Config", "VerifyConfig",
]
