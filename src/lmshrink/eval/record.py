"""Result records: every number with the protocol and the environment that produced it."""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone


def environment() -> dict:
    import torch
    import transformers

    from .. import __version__

    return {
        "lmshrink": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
