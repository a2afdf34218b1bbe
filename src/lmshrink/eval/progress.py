"""A progress bar over windows that shows tokens/s (tqdm on stderr; silent when disabled)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def bar(total: int, desc: str, enabled: bool = True, unit: str = "win"):
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                leave=False)
