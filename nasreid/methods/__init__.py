"""Training methods of a retrain (``training.method``), each one file on the :class:`TrainingMethod` base.

* ``supervised`` (default): ID + triplet on PK batches (:mod:`.supervised`);
* ``qaconv``: QAConv with a class memory, Liao & Shao ECCV 2020 (:mod:`.qaconv`);
* ``domainmix``: labelled synthetic A + unlabelled real B, Wang et al. BMVC 2021 (:mod:`.domainmix`).

``nasreid list methods`` prints them with their first docstring line; a user's own method is a file listed
under a recipe's ``plugins:`` (see :mod:`.base`).
"""
from importlib import import_module
from typing import Any

from .base import COMMON_KEYS, TrainingMethod, param_groups_by_lr_mult, unhonoured_keys
from .supervised import SupervisedMethod

#: the paper-specific methods, imported on first use (the registry imports them on its first lookup)
_LAZY = {"QAConvMethod": ".qaconv", "DomainMixMethod": ".domainmix"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TrainingMethod", "COMMON_KEYS", "unhonoured_keys", "param_groups_by_lr_mult", "SupervisedMethod",
           "QAConvMethod", "DomainMixMethod"]
