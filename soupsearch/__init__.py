"""soupsearch: search for the best weight-space average (soup) of fine-tuned checkpoints."""

from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    EvaluationError,
    ModelFactoryError,
    RecipeError,
    SoupSearchError,
    TrackingError,
)
from .merge import dare, fisher_soup, greedy_soup, uniform_soup, weighted_soup
from .ingredients import IngredientStack, ParamLayout, discover, load_state_dict
from .mixing import Recipe, fisher_mix, mix
from .models import create_model, register_model

__all__ = [
    "SoupSearchError", "ConfigError", "CheckpointError", "DataError", "ModelFactoryError", "RecipeError",
    "EvaluationError", "TrackingError",
    "IngredientStack", "ParamLayout", "discover", "load_state_dict",
    "Recipe", "mix", "fisher_mix",
    "create_model", "register_model",
    "uniform_soup", "weighted_soup", "fisher_soup", "greedy_soup", "dare",
]
