"""Search spaces of nasreid (installed as ``nasreid.search_spaces``); each registers itself by name."""
from . import (
    msinet,  # noqa: F401  (registers "msinet")
    osnet_ain,  # noqa: F401  (registers "osnet_ain")
    rmgl,  # noqa: F401  (registers "rmgl")
)

__all__ = ["msinet", "osnet_ain", "rmgl"]
