import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data directory (../shared/data beside the repository, or $LMSHRINK_DATA)."""
    path = Path(os.environ.get("LMSHRINK_DATA", SHARED_DATA))
    if not (path / "wikitext-2-raw").is_dir():
        pytest.skip(f"shared data not found at {path}; set LMSHRINK_DATA")
    return path
