"""Search strategies of nasreid (installed as ``nasreid.strategies``); each registers itself by name.

:mod:`.hpo_workers` starts the worker processes of ``nasreid hpo`` for a :class:`SamplingStrategy` (it uses the
engine, so it is imported by its module path, not from here)."""
from . import (
    darts_tcm,  # noqa: F401  (registers "darts_tcm")
    gumbel,  # noqa: F401  (registers "gumbel")
    optuna_hpo,  # noqa: F401  (registers "optuna")
    random,  # noqa: F401  (registers "random")
    spos,  # noqa: F401  (registers "spos")
)
from .base import OneShotStrategy, SamplingStrategy, Strategy, StrategyConfigError

__all__ = ["Strategy", "OneShotStrategy", "SamplingStrategy", "StrategyConfigError"]
