"""DARE (drop and rescale, Yu et al., 2024) before mixing: each ingredient's delta from the
base model has a fraction ``p`` of its entries dropped (seeded) and the rest rescaled by
``1/(1-p)``; then the uniform soup and the greedy set are mixed from those. The method
itself is :mod:`soupsearch.merging.methods.dare`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from soupsearch.strategies import register_strategy
from soupsearch.strategies._base import SetName
from soupsearch.strategies.merge import MethodPreset


@register_strategy
class Dare(MethodPreset):
    name = "dare"
    method = "dare"
    description = "drop-and-rescale deltas from the base model, then uniform / greedy-set mixing"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        p: float = Field(default=0.9, ge=0, lt=1)
        seed: int = 0
        sets: list[SetName] = ["all", "greedy"]
