"""Strategy registry: one module per strategy, registered by name.

The registry is lazy: importing this package loads only the machinery it re-exports
(:mod:`._base`); the strategy modules are imported on the first :func:`list_strategies` /
:func:`get_strategy_class` (every module of the package, in name order, so adding a strategy
is adding its module). What a strategy needs from a search (the base model, per-ingredient
statistics, the ingredients' predictions, other strategies' results) is class metadata on it
(see :class:`._base.Strategy`); :func:`default_strategies` are the ones a config without
``search.strategies`` runs.

Modules that are not strategies start with ``_`` and the registry skips them: :mod:`._base`
(the contract: ``SearchContext``, ``Strategy``, ``SoupResult``), :mod:`._asktell` (the one
asynchronous ask/tell loop), and the Optuna strategies' parts: :mod:`._study` (storage,
naming, resume), :mod:`._space` (search spaces), :mod:`._trials` (the trial loop),
:mod:`._study_plots`, :mod:`._neighbourhood` (centred regions)."""

from __future__ import annotations

import inspect

from soupsearch.strategies._base import Needs, SearchContext, SoupResult, Strategy
from soupsearch.util.plugins import PluginRegistry

_PLUGINS: PluginRegistry[Strategy] = PluginRegistry(__name__, __path__, "strategy")
_REGISTRY = _PLUGINS.classes
register_strategy = _PLUGINS.register
_load = _PLUGINS.load


def _ordered() -> list[str]:
    """Registered names by module, then by place in the module: the same order whatever was
    imported first."""
    def key(name):
        cls = _REGISTRY[name]
        try:
            line = inspect.getsourcelines(cls)[1]
        except (OSError, TypeError):  # defined where there is no source (e.g. interactively)
            line = 0
        return cls.__module__, line, name

    return sorted(_REGISTRY, key=key)


def list_strategies() -> list[str]:
    """Names of the registered strategies, by module and then place in it."""
    _load()
    return _ordered()


def get_strategy_class(name: str) -> type[Strategy]:
    from soupsearch.errors import ConfigError

    _load()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown strategy {name!r}; valid: {', '.join(_ordered())}")
    return _REGISTRY[name]


def create_strategy(name: str, **options) -> Strategy:
    return get_strategy_class(name)(**options)


def needs_of(name: str, options: dict | None = None) -> Needs:
    """What strategy ``name`` with ``options`` (as in the config) needs from a search."""
    cls = get_strategy_class(name)
    return cls.needs(cls.validate_options(options or {}))


def default_strategies() -> list[str]:
    """The strategies a search runs when the config names none (``Strategy.default_rank``)."""
    _load()
    ranked = [(_REGISTRY[name].default_rank, name) for name in _ordered() if _REGISTRY[name].default_rank is not None]
    return [name for _, name in sorted(ranked)]


__all__ = ["Strategy", "SoupResult", "SearchContext", "Needs", "register_strategy", "list_strategies",
           "get_strategy_class", "create_strategy", "default_strategies", "needs_of"]
