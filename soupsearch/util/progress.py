"""Progress of the long phases: scoring the ingredients, each strategy, Optuna's trials.

On a terminal every phase gets a tqdm bar with counts, rate and (when the total is known)
an ETA; the Optuna bar shows the best value so far. When stderr is not a terminal, in CI
(``$CI`` set) or with ``set_progress(False)``, nothing is drawn: the driver's one line per
phase (``[soupsearch] scored 16 ingredients ... in 16.2s``) is the whole report.

The pool calls :func:`advance` once per evaluated shard; the innermost open bar whose unit
is ``"shard"`` counts it. Phases nest: a strategy's bar counts shards, a study's bar inside
it counts trials (shards then go uncounted until it closes).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

_mode: bool | None = None  # None: automatic (a terminal and not CI)
_bars: list["Bar"] = []
_lock = threading.Lock()


def set_progress(enabled: bool | None) -> None:
    """Progress bars on (True), off (False) or automatic (None: on when stderr is a terminal
    and ``$CI`` is not set). The Python API's switch; the CLI sets it from ``--no-progress``."""
    global _mode
    _mode = enabled


def enabled() -> bool:
    if _mode is not None:
        return _mode
    try:
        tty = sys.stderr.isatty() and os.get_terminal_size(sys.stderr.fileno()).columns >= 20
    except (AttributeError, ValueError, OSError):  # no fileno, or a terminal of no size (a bare pty)
        tty = False
    return tty and not os.environ.get("CI") and os.environ.get("TERM") != "dumb"


class Bar:
    """One phase's bar (a no-op when progress is off)."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "shard"):
        self.unit = unit
        self.n = 0
        self._t = None
        if enabled():
            from tqdm import tqdm

            self._t = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True,
                           mininterval=0.5, position=len(_bars))

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._t is not None:
            self._t.update(n)

    def postfix(self, text: str) -> None:
        if self._t is not None:
            self._t.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        if self._t is not None:
            self._t.close()
            self._t = None


@contextlib.contextmanager
def phase(desc: str, total: int | None = None, unit: str = "shard"):
    """A bar for the duration of a block; :func:`advance` updates it."""
    b = Bar(desc, total, unit)
    with _lock:
        _bars.append(b)
    try:
        yield b
    finally:
        with _lock:
            if b in _bars:
                _bars.remove(b)
        b.close()


def advance(unit: str = "shard", n: int = 1) -> None:
    """Count ``n`` units on the innermost open bar (when its unit is ``unit``)."""
    if _bars and _bars[-1].unit == unit:
        _bars[-1].update(n)


def active() -> bool:
    return any(b._t is not None for b in _bars)


def say(msg: str) -> None:
    """A status line of the driver (``[soupsearch] ...``) on stderr."""
    write(f"[soupsearch] {msg}")


def write(line: str) -> None:
    """A line on stderr that does not tear an open bar."""
    if active():
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


def quiet_logs(verbose: bool, search: bool = False) -> None:
    """Optuna's per-trial and MLflow's INFO lines only with ``--verbose``; soupsearch's debug log
    then. ``search``: this command runs a search (Optuna is configured now; its first import
    would reset its level)."""
    import logging

    level = logging.INFO if verbose else logging.WARNING
    # MLflow sets its loggers' level from this variable when it is imported ("Creating initial tables")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", logging.getLevelName(level))
    logging.getLogger("mlflow").setLevel(level)
    if search:
        import optuna

        optuna.logging.set_verbosity(level)
    if verbose:
        logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
        logging.getLogger("soupsearch").setLevel(logging.DEBUG)
