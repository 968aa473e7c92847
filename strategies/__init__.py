"""Search strategies of nasreid (installed as ``nasreid.strategies``); each registers itself by name."""
from . import darts_tcm  # noqa: F401  (registers "darts_tcm")
from . import gumbel  # noqa: F401  (registers "gumbel")
from . import optuna_hpo  # noqa: F401  (registers "optuna")
from . import random  # noqa: F401  (registers "random")
from .base import OneShotStrategy, Strategy, StrategyConfigError

__all__ = ["Strategy", "OneShotStrategy", "StrategyConfigError"]
