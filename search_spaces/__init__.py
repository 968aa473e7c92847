"""Search spaces of nasreid (installed as ``nasreid.search_spaces``); each registers itself by name."""
from . import osnet_ain  # noqa: F401  (registers "osnet_ain")

__all__ = ["osnet_ain"]
