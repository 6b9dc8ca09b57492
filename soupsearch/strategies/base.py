"""Strategy contract.

A strategy proposes recipes and reads their scores through a :class:`SearchContext`;
it never sees Ray, MLflow or the stack's memory. Selection uses the held-out ``val``
split only; the driver scores the returned soups on every split afterwards.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import selection
from ..errors import ConfigError
from ..mixing import Recipe


class SearchContext(Protocol):
    """What a strategy may use. Implementations: ``search.Context`` (Ray or local pool)
    and the table-driven fakes in the tests."""

    n: int
    names: list[str]
    selection_metric: str
    higher_is_better: bool

    def evaluate(self, recipes: Sequence[Recipe], split: str = "val") -> list[dict[str, float]]:
        """Metrics of each recipe on a split; independent recipes are scored in parallel."""

    num_evaluators: int
    run_dir: "Path"  # where a strategy may keep durable state (e.g. the Optuna SQLite study)
    fingerprint: str  # identifies the ingredient stack (for study names / resume)
    seed: int
    layer_groups: list[str]  # names of the layer groups at the configured group depth
    group_depth: int  # module depth of those layer groups

    def submit(self, recipe: Recipe, split: str = "val", must_reach: tuple[float, bool] | None = None,
               reference: Recipe | None = None) -> int:
        """Start scoring a recipe asynchronously; returns a ticket. ``must_reach=(score,
        strict)``: only whether the selection metric reaches ``score`` matters, so scoring
        may stop early and report a bound (``"stopped_early": True``) when it cannot;
        ``reference`` (the recipe that scored ``score``) lets its hardest shards go first."""

    def wait(self, num_returns: int = 1) -> list[tuple[int, Recipe, dict[str, float]]]:
        """Block until >= ``num_returns`` submissions completed; ``(ticket, recipe, metrics)``."""

    def cancel(self, ticket: int) -> None:
        """Optional: drop a submission whose result is no longer wanted."""

    def individual_scores(self) -> list[float]:
        """Selection metric of every ingredient on val (cached after the first call)."""

    def result(self, strategy: str) -> "SoupResult | None":
        """The result of a strategy that already ran in this search (e.g. greedy for seeding)."""


@dataclass
class SoupResult:
    """One candidate soup (or baseline) a strategy returns."""

    name: str  # e.g. "greedy"
    recipe: Recipe | None  # None for output ensembles (no single weight vector)
    params: dict[str, Any] = field(default_factory=dict)  # strategy settings, logged as MLflow params
    trajectory: list[dict[str, Any]] = field(default_factory=list)  # step records
    info: dict[str, Any] = field(default_factory=dict)  # anything else (e.g. ingredient indices)
    step_metrics: list[dict[str, float]] = field(default_factory=list)  # logged with step=i (e.g. trial values)
    artifacts: dict[str, Any] = field(default_factory=dict)  # artifact name -> local file path (plots, json)

    @property
    def num_ingredients(self) -> int:
        return len(self.recipe.support()) if self.recipe is not None else int(self.info.get("num_ingredients", 0))


class Strategy(ABC):
    """Base class. Subclasses set ``name``, an ``Options`` pydantic model and ``run``.

    Contract: ``run`` is deterministic given the context's scores and the options;
    it returns at least one :class:`SoupResult`; it raises (never returns None) on
    failure.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    label: str  # the run name of this instance (defaults to ``name``; set ``label:`` in the config)

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, label: str | None = None, **options):
        self.options = self.validate_options(options)
        self.label = label or self.default_label(self.options)

    @classmethod
    def default_label(cls, options: BaseModel) -> str:
        """The run name when the config gives no ``label`` (the strategy's name)."""
        return cls.name

    @classmethod
    def requirements(cls, options: BaseModel) -> set[str]:
        """What the search must provide for these options: ``"base"`` (ingredients.base)
        and per-ingredient statistics such as ``"fisher"`` (data.fisher). Read by config
        validation before anything starts."""
        return set()

    @classmethod
    def validate_options(cls, options: dict) -> BaseModel:
        try:
            return cls.Options.model_validate(options or {})
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            msg = "unknown option" if err["type"] == "extra_forbidden" else err["msg"]
            raise ConfigError(f"strategy {cls.name}: option {loc!r}: {msg}") from None

    @abstractmethod
    def run(self, ctx: SearchContext) -> list[SoupResult]: ...


# a set of ingredients a soup is made of: every one, the greedy soup's, or the k best on val
SetName = Annotated[str, Field(pattern=r"^(all|greedy|top[1-9][0-9]*)$")]


def rank_by_score(scores: list[float], higher_is_better: bool = True) -> list[int]:
    """Indices sorted best first; ties broken by the lower index (deterministic)."""
    return selection.rank(scores, higher_is_better)


def member_sets(ctx: SearchContext, sets, label: str) -> list[tuple[str, str, list[int]]]:
    """``(which, result name, member indices)`` for each of ``sets`` (``all``: every ingredient,
    ``topK``: the K best by val score, ``greedy``: the greedy soup's set, skipped with a log
    line when greedy has not run)."""
    out = []
    for which in sets:
        if which == "all":
            out.append((which, label, list(range(ctx.n))))
            continue
        if which.startswith("top"):
            k = min(int(which[3:]), ctx.n)
            best = rank_by_score(ctx.individual_scores(), ctx.higher_is_better)[:k]
            out.append((which, f"{label}_{which}", sorted(best)))
            continue
        g = ctx.result("greedy")
        if g is None or g.recipe is None:
            ctx.log(f"{label}: greedy did not run before it; skipping the greedy set")
            continue
        out.append((which, f"{label}_greedy", g.recipe.support()))
    return out
