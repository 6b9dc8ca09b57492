"""soupsearch: search for the best weight-space average (soup) of fine-tuned checkpoints."""

from soupsearch.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    EvaluationError,
    ModelFactoryError,
    RecipeError,
    SoupSearchError,
    TrackingError,
)
from soupsearch.evaluation.barriers import barrier, path_metrics
from soupsearch.evaluation.bnreset import reset_bn_stats
from soupsearch.evaluation.significance import mcnemar, paired_bootstrap, stratified_paired_bootstrap
from soupsearch.ingredients.discovery import IngredientStack, discover, load_state_dict
from soupsearch.ingredients.layout import ParamLayout
from soupsearch.ingredients.rebasin import AlignError, align, permutation_spec
from soupsearch.merging.api import dare, fisher_soup, greedy_soup, merge, uniform_soup, weighted_soup
from soupsearch.merging.methods import get_method, list_methods, register_method
from soupsearch.merging.methods._base import MergeMethod
from soupsearch.merging.mixing import Recipe, mix
from soupsearch.models.factory import create_model, register_model

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
