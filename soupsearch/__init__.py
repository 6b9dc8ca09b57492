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
from .merge import dare, fisher_soup, greedy_soup, merge, uniform_soup, weighted_soup
from .ingredients import IngredientStack, ParamLayout, discover, load_state_dict
from .methods import MergeMethod, get_method, list_methods, register_method
from .mixing import Recipe, mix
from .models import create_model, register_model
from .barriers import barrier, path_metrics
from .bnreset import reset_bn_stats
from .rebasin import AlignError, align, permutation_spec
from .significance import mcnemar, paired_bootstrap, stratified_paired_bootstrap

__all__ = [
    "SoupSearchError", "ConfigError", "CheckpointError", "DataError", "ModelFactoryError", "RecipeError",
    "EvaluationError", "TrackingError",
    "IngredientStack", "ParamLayout", "discover", "load_state_dict",
    "Recipe", "mix", "MergeMethod", "list_methods", "get_method", "register_method",
    "create_model", "register_model",
    "merge", "uniform_soup", "weighted_soup", "fisher_soup", "greedy_soup", "dare",
    "align", "permutation_spec", "AlignError", "reset_bn_stats", "barrier", "path_metrics",
    "paired_bootstrap", "mcnemar", "stratified_paired_bootstrap",
]
