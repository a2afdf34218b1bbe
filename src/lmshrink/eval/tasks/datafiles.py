"""Finding and reading task files in the data directory, with a best-effort Hugging Face datasets fallback."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lmshrink.core.errors import DataSourceError
from lmshrink.data.hub import load_dataset_or_cache
from lmshrink.eval.tasks.spec import Doc, TaskSpec

DATA_ENV = "LMSHRINK_DATA"


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The data directory: the argument, else ``$LMSHRINK_DATA``, else None."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else None


def read_jsonl(path: Path) -> list[Doc]:
    """Rows of a JSON-lines file (blank lines skipped)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_lines(path: Path) -> list[str]:
    """Non-blank lines of a text file, stripped."""
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def _load_from_hub(spec: TaskSpec) -> list[Doc] | None:
    """The task's documents from the hub as lm-eval reads them, or None when that is not possible."""
    if spec.hub is None:
        return None
    try:
        import datasets  # noqa: F401  (optional dependency)
    except ImportError:
        return None
    try:  # from the local datasets cache only, at once, when the hub cannot be asked
        rows = load_dataset_or_cache(spec.hub.path, spec.hub.name, split=spec.hub.split)
    except Exception:  # any hub failure just means "not available"; the caller reports the local path
        return None
    return [spec.from_hub(dict(row)) for row in rows]


def load_docs(spec: TaskSpec, data_dir: Path | None) -> tuple[list[Doc], str]:
    """The task's documents and where they came from (a folder path or ``hf:<dataset>``).

    Raises DataSourceError naming the expected files and the fix when neither the local files nor the hub
    can provide them.
    """
    missing: list[Path] = []
    if data_dir is not None:
        folder = data_dir / spec.folder
        missing = [folder / name for name in spec.files if not (folder / name).is_file()]
        if not missing:
            return spec.read_local(folder), str(folder / spec.files[0])
    docs = _load_from_hub(spec)
    if docs is not None:
        return docs, f"hf:{spec.hub.path}" + (f"/{spec.hub.name}" if spec.hub.name else "") + f":{spec.hub.split}"
    if data_dir is None:
        raise DataSourceError(
            f"task {spec.name!r} needs its data files ({spec.folder}/{', '.join(spec.files)}) and no data "
            f"directory was given",
            fix=f"pass --data-dir DIR (or set ${DATA_ENV}) where DIR/{spec.folder}/{spec.files[0]} exists",
        )
    raise DataSourceError(
        f"task {spec.name!r}: missing data file(s) {', '.join(str(p) for p in missing)}",
        fix=f"pass --data-dir pointing at a folder that holds {spec.folder}/{spec.files[0]} "
            f"(or set ${DATA_ENV})",
    )
