"""Strategy contract.

A strategy proposes recipes and reads their scores through a :class:`SearchContext`;
it never sees Ray, MLflow or the stack's memory. Selection uses the held-out ``val``
split only; the driver scores the returned soups on every split afterwards.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Mapping, Protocol, Sequence, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from soupsearch.errors import ConfigError
from soupsearch.evaluation import selection
from soupsearch.merging.mixing import Recipe

if TYPE_CHECKING:
    import numpy as np


@runtime_checkable
class SearchContext(Protocol):
    """Everything a strategy may use of a search. Implementations: the driver's ``Context``
    (an EvalPool, local or on Ray) and ``tests/fake_context.FakeContext`` (a score table).

    Contract for every implementation:

    * **Threads.** A context is used from one thread, the one that called
      ``Strategy.run``; no member is thread-safe. Strategies run one at a time.
    * **Attributes** are read-only and fixed for the whole search.
    * **Caching.** Scores are cached by the recipe's key, split and shard: scoring a recipe
      again (e.g. ``evaluate`` after ``submit``/``wait``) computes only what was not scored
      yet and gives the same numbers (an early-stopped bound is never cached as a score).
      ``individual_scores`` and ``logprobs`` are computed once per search.
    * **Blocking.** ``evaluate``, ``evaluate_all``, ``wait``, ``individual_scores``,
      ``logprobs`` and ``learn_coefficients`` block until their results exist. ``submit`` and
      ``cancel`` return at once, except that the first recipe needing a per-ingredient
      statistic (e.g. Fisher) waits for its estimation.
    * **Failures** raise :class:`~soupsearch.errors.SoupSearchError` subclasses, never return
      ``None`` or NaN for a failed evaluation; an evaluation that failed for good raises
      :class:`~soupsearch.errors.EvaluationError` whose ``tickets``/``recipe_key`` say which
      submission it belongs to (empty/None when it cannot tell).
    * **Determinism.** Same ingredients, splits and recipes: same metrics, whatever the
      number of evaluators and the order submissions complete in.
    """

    n: int  # number of ingredients
    names: Sequence[str]  # the ingredients' names, index order
    hparams: Sequence[Mapping[str, Any]]  # per ingredient: its manifest hyperparameters ({} without a manifest)
    has_base: bool  # whether the pre-trained base model is configured (ingredients.base)
    selection_metric: str  # the val metric strategies compare (soupsearch.evaluation.selection)
    higher_is_better: bool  # its direction
    eval_splits: Sequence[str]  # every split a soup is scored on (val, test, the shifted sets)
    num_evaluators: int  # independent evaluations that can run at once (>= 1)
    run_dir: Path  # where a strategy may keep durable state (the Optuna study, plots)
    fingerprint: str  # identifies the ingredient stack (study names, resume)
    seed: int  # the search's seed
    layer_groups: Sequence[str]  # names of the layer groups at ``group_depth``
    group_depth: int  # module depth of those layer groups (per-layer recipes)

    def evaluate(self, recipes: Sequence[Recipe], split: str = "val") -> list[dict[str, float]]:
        """Metrics of each recipe on ``split``, in order; independent recipes are scored in
        parallel. Blocks. Strategies select on ``val`` only."""
        ...

    def evaluate_all(self, recipes: Sequence[Recipe]) -> list[dict[str, dict[str, float]]]:
        """Metrics of each recipe on every split of ``eval_splits`` (``{split: metrics}``),
        plus ``ood_mean`` when there are shifted sets. Blocks. For analyses that report every
        split (e.g. interpolation paths); selection still reads ``val`` only."""
        ...

    def submit(self, recipe: Recipe, split: str = "val", must_reach: tuple[float, bool] | None = None,
               reference: Recipe | None = None) -> int:
        """Start scoring ``recipe`` on ``split``; returns a ticket for :meth:`wait`. Does not
        block (see the class docstring). ``must_reach=(score, strict)``: only whether the
        selection metric reaches ``score`` (``> score`` when ``strict``) matters, so scoring
        may stop early and report an upper bound with ``"stopped_early": True`` when it
        cannot (exact for accuracy-bounded metrics); ``reference`` (the recipe that scored
        ``score``) lets its hardest shards go first."""
        ...

    def wait(self, num_returns: int = 1) -> list[tuple[int, Recipe, dict[str, float]]]:
        """Block until at least ``num_returns`` submissions completed; returns them as
        ``(ticket, recipe, metrics)`` (the recipe as scored: the context may complete it, e.g.
        with the tag of the statistics it used). Never returns a cancelled ticket. Raises
        ``EvaluationError`` when a submission failed for good."""
        ...

    def cancel(self, ticket: int) -> None:
        """Drop a submission whose result is no longer wanted: :meth:`wait` never returns it;
        its work not yet started is dropped. Does not block; a ticket already returned or
        unknown is ignored."""
        ...

    def individual_scores(self) -> list[float]:
        """The selection metric of every ingredient on val (computed once, then cached)."""
        ...

    def result(self, strategy: str) -> "SoupResult | None":
        """The result named ``strategy`` (a label) of a strategy that already ran in this
        search (e.g. greedy's, to start from), or None when none did."""
        ...

    def logprobs(self, i: int, split: str) -> np.ndarray:
        """Per-example log-probabilities ``[N, C]`` of ingredient ``i`` on ``split`` (one of
        ``eval_splits``). Cached; the driver keeps them when a strategy declares
        ``needs_predictions``, otherwise the first call costs a forward pass. Blocks."""
        ...

    def labels(self, split: str) -> np.ndarray:
        """The labels ``[N]`` (int) of ``split``, in the order of :meth:`logprobs`' rows."""
        ...

    def learn_coefficients(self, split: str, **options: Any) -> dict[str, Any]:
        """Mixing coefficients learned by gradient descent on ``split``, where the stack lives
        (one evaluator). ``options``: ``per_layer, group_depth, temperature, epochs, lr,
        weight_decay, batch_size, seed, init`` (see :func:`soupsearch.evaluation.gradsoup.learn_coefficients`).
        Returns ``{"coeffs": rows (one per layer group, or one), "losses": per epoch}``. Blocks."""
        ...

    def log(self, msg: str) -> None:
        """A line for the user (the search's log); strategies never print."""
        ...


@dataclass(frozen=True)
class Needs:
    """What a strategy needs from the search for given options (see ``Strategy.needs``)."""

    base: bool = False  # the pre-trained base model (ingredients.base)
    stats: frozenset[str] = frozenset()  # per-ingredient statistics, e.g. "fisher" (data.fisher)
    predictions: bool = False  # the ingredients' per-example predictions (ctx.logprobs) on every split
    results: tuple[str, ...] = ()  # results of strategies it reads when they ran before it (optional)


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

    Contract: ``run`` uses only the :class:`SearchContext` protocol; it is deterministic
    given the context's scores, the options and the seed; it returns at least one
    :class:`SoupResult` (a recipe of ``ctx.n`` coefficients, or None with
    ``info["metrics"]`` per split for an output ensemble); it raises (never returns None)
    on failure. What it needs from a search is class metadata (``needs_base``,
    ``needs_stats``, ``needs_predictions``, ``needs_result``), or :meth:`needs` when that
    depends on the options; ``tests/strategies/test_conformance.py`` checks all of it for every
    registered strategy.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    # what it needs (read by config validation and the driver; see ``needs`` for options that change it)
    needs_base: ClassVar[bool] = False  # the pre-trained base model (ingredients.base)
    needs_stats: ClassVar[frozenset[str]] = frozenset()  # per-ingredient statistics (e.g. "fisher")
    needs_predictions: ClassVar[bool] = False  # the ingredients' per-example predictions (ctx.logprobs)
    needs_result: ClassVar[tuple[str, ...]] = ()  # results it reads when they ran before it (optional)
    is_baseline: ClassVar[bool] = False  # its results are reference points, not soups (reports, tables)
    default_rank: ClassVar[int | None] = None  # position in the default strategy list (None: not in it)
    # the smallest options it runs with when it has required ones (docs, the conformance tests)
    example_options: ClassVar[dict[str, Any]] = {}
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
    def needs(cls, options: BaseModel) -> Needs:
        """What the search must provide for these options; the class metadata by default.
        Strategies whose needs depend on their options (a merge method that needs the base)
        override this."""
        return Needs(base=cls.needs_base, stats=frozenset(cls.needs_stats), predictions=cls.needs_predictions,
                     results=tuple(cls.needs_result))

    @classmethod
    def requirements(cls, options: BaseModel) -> set[str]:
        """``needs`` as a set: ``"base"`` (ingredients.base) and the names of per-ingredient
        statistics such as ``"fisher"`` (data.fisher). Read by config validation before
        anything starts."""
        n = cls.needs(options)
        return ({"base"} if n.base else set()) | set(n.stats)

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


def results_of_sets(sets) -> tuple[str, ...]:
    """The results :func:`member_sets` reads for ``sets`` (``greedy``: the greedy soup's)."""
    return ("greedy",) if "greedy" in (sets or ()) else ()


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
