"""Strategy registry: one module per strategy, registered by name."""

from __future__ import annotations

from .base import SearchContext, SoupResult, Strategy

_REGISTRY: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    _REGISTRY[cls.name] = cls
    return cls


def list_strategies() -> list[str]:
    return list(_REGISTRY)


def get_strategy_class(name: str) -> type[Strategy]:
    from ..errors import ConfigError

    if name not in _REGISTRY:
        raise ConfigError(f"unknown strategy {name!r}; valid: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def create_strategy(name: str, **options) -> Strategy:
    return get_strategy_class(name)(**options)


from . import basic, dare, ema, ensemble, fisher, gradient, greedy, interpolate, learned, line_search, merge, tune  # noqa: E402,F401,I001  (registration side effects)

__all__ = ["Strategy", "SoupResult", "SearchContext", "register_strategy", "list_strategies",
           "get_strategy_class", "create_strategy"]
