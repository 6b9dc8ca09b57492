"""Fisher-weighted soups (Matena & Raffel, 2022):
``theta = sum_i l_i F_i theta_i / sum_i l_i F_i`` with a floor on ``F``, over all
ingredients and over the greedy set. The Fisher stack is estimated once per search on
the evaluators (``fisher:`` section of the config); ``l`` is uniform here and tuned by
``fisher_learned``. The method itself is :mod:`soupsearch.merging.methods.fisher`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from soupsearch.strategies import register_strategy
from soupsearch.strategies._base import SetName
from soupsearch.strategies.merge import MethodPreset


@register_strategy
class FisherSoup(MethodPreset):
    name = "fisher"
    method = "fisher"
    description = "Fisher-weighted average of all ingredients and of the greedy set"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        floor: float = Field(default=1e-6, gt=0)  # epsilon floor on the Fisher values
        sets: list[SetName] = ["all", "greedy"]
