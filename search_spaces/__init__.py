"""Search spaces of nasreid (installed as ``nasreid.search_spaces``); each registers itself by name."""
from . import msinet  # noqa: F401  (registers "msinet")
from . import osnet_ain  # noqa: F401  (registers "osnet_ain")
from . import rmgl  # noqa: F401  (registers "rmgl")

__all__ = ["msinet", "osnet_ain", "rmgl"]
