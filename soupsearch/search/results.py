"""What a search returns: one row per ingredient and per soup, with its metrics on every split."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from soupsearch.config import Config
from soupsearch.ingredients.columns import StackInfo
from soupsearch.strategies._base import SoupResult


@dataclass
class CandidateRow:
    name: str
    kind: str  # "ingredient" | "soup" | "baseline"
    num_ingredients: int
    metrics: dict[str, dict[str, float]]  # split -> metric -> value (plus "ood_mean")
    info: dict = field(default_factory=dict)
    forward_passes: int = 1  # inference cost: 1 for any soup, n for an output ensemble

    def flat(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "num_ingredients": self.num_ingredients,
             "forward_passes": self.forward_passes}
        for split, ms in self.metrics.items():
            for m, v in ms.items():
                d[f"{split}/{m}"] = v
        return d


@dataclass
class SearchOutcome:
    config: Config
    run_dir: Path
    ingredients: list[CandidateRow]
    soups: list[CandidateRow]
    results: dict[str, SoupResult]
    parent_run_id: str | None
    child_run_ids: dict[str, str]
    pool_stats: dict
    node_ids: list[str]
    shift_names: list[str]
    seconds: float
    stack: StackInfo | None = None  # the ingredients (names, layout)
    spread: dict | None = None  # per-tensor distances of the ingredients to the best soup (layer-spread plot)
    startup_seconds: float | None = None  # from the start of run_search to the first shard scored
