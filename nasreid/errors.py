"""The root of nasreid's own exceptions.

Everything that is the *user's input* being wrong -- a recipe, a genotype, a dataset layout, a corrupt
image, a checkpoint, a registry name, a diverged run -- raises a subclass of :class:`NasreidError`. The
command line prints those as one line (``nasreid <command>: error: ...``) and exits with status 2; every
other exception is a bug (or the machine's: CUDA out of memory) and keeps its traceback.

The concrete classes also derive from the built-in exception they historically were (``ValueError``,
``KeyError``, ``OSError`` ...), so ``except ValueError`` in user code keeps working.

Example::

    >>> from nasreid.errors import NasreidError
    >>> from nasreid.config import RecipeError
    >>> issubclass(RecipeError, NasreidError)
    True
"""
from __future__ import annotations

__all__ = ["NasreidError", "RecipeError", "RegistryError", "NonFiniteLossError", "RunFolderError"]


class NasreidError(Exception):
    """Base class of every error caused by the user's input (recipe, genotype, data, checkpoint, run)."""


class RecipeError(NasreidError, ValueError):
    """A recipe cannot be read or validated; the message names the file and the key.

    Defined here (a leaf module) so that :mod:`nasreid.registry` raises it without importing
    :mod:`nasreid.config`; ``from nasreid.config import RecipeError`` keeps working.
    """


class RegistryError(NasreidError, KeyError, ValueError):
    """An unknown name in a registry (the message lists the known ones), or a name registered twice.

    Both a ``KeyError`` (lookups) and a ``ValueError`` (registration), as the registries' errors were before.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class NonFiniteLossError(NasreidError, FloatingPointError):
    """A training loss became NaN or infinite; the message names the epoch (1-based), step and loss parts.

    The run stops before anything is written, so ``checkpoints/last.pt`` still holds the last good epoch
    and ``--resume`` restarts from it (typically after lowering the learning rate with ``--set``).
    """


class RunFolderError(NasreidError, FileExistsError):
    """A run folder cannot be used: it already holds a run (pass ``--resume``), or it is not a run folder."""
