"""Whether to show progress bars: a leaf module (standard library only), so that the run context, the run
folders, the evaluation runner and the extractor all ask it without importing one another."""
from __future__ import annotations

import os
import sys

__all__ = ["progress_enabled"]


def progress_enabled() -> bool:
    """Progress bars on a terminal unless ``NASREID_NO_PROGRESS`` is set."""
    return sys.stderr.isatty() and not os.environ.get("NASREID_NO_PROGRESS")
