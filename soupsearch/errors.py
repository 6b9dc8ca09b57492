"""Exception hierarchy: one root, specific subclasses.

Every error a user can cause derives from :class:`SoupSearchError`; the CLI turns
them into a one-line message and exit code 2. Messages name the file / key / tensor
and say what was expected against what was found.
"""


class SoupSearchError(Exception):
    """Root of all soupsearch errors caused by input, configuration or environment."""


class ConfigError(SoupSearchError, ValueError):
    """The YAML config or a ``--set`` override is invalid."""


class CheckpointError(SoupSearchError):
    """A checkpoint is missing, unreadable, unsafe, or does not match the model."""


class DataError(SoupSearchError):
    """An evaluation split or dataset is missing, empty or malformed."""


class ModelFactoryError(SoupSearchError):
    """The configured model factory cannot be imported or called."""


class RecipeError(SoupSearchError, ValueError):
    """Mixing coefficients are of the wrong length, negative, NaN, or do not sum to 1."""


class EvaluationError(SoupSearchError):
    """Evaluating a candidate failed repeatedly (on every evaluator).

    ``tickets``: the submissions the failure belongs to (empty: unknown, e.g. every
    evaluator died); ``recipe_key``: the failed candidate's key, when one candidate failed."""

    def __init__(self, message: str, *, tickets: tuple[int, ...] = (), recipe_key: str | None = None):
        super().__init__(message)
        self.tickets = tuple(tickets)
        self.recipe_key = recipe_key


class TrackingError(SoupSearchError):
    """MLflow could not be reached or written."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when empty), cut to ``limit``
    characters: what a one-line error quotes of a cause."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def reporting_errors(run, debug: bool = False) -> int:
    """Run a command (``run()`` returns its exit code); a :class:`SoupSearchError` becomes one
    line on stderr (secrets redacted) and exit code 2 (the traceback too with ``debug``), an
    interrupt exit code 130."""
    import sys
    import traceback

    try:
        return int(run() or 0)
    except SoupSearchError as e:
        if debug:
            traceback.print_exc()
        from soupsearch.util.redact import redact

        msg = "; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip()) or type(e).__name__
        print(f"soupsearch: error: {redact(msg)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soupsearch: interrupted", file=sys.stderr)
        return 130
