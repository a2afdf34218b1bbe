"""Text sources: named sets resolved from a data directory (or HF datasets), files, and packaged text."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from lmshrink.core.errors import DataSourceError
from lmshrink.data.hub import HubUnavailable

DEFAULT_TEXT = "enwiki-sample"

# Splits each named set accepts, mapped to a canonical name.
_SPLITS = {
    "wikitext2": {"test": "test", "valid": "valid", "validation": "valid", "train": "train"},
    "c4": {"train": "train", "valid": "valid", "validation": "valid"},
    "ptb": {"test": "test", "valid": "valid", "validation": "valid", "train": "train"},
    "enwiki-sample": {"calib": "calib", "train": "calib", "eval": "eval", "test": "eval", "valid": "eval",
                      "validation": "eval"},
}
_ALIASES = {"wikitext": "wikitext2", "wikitext-2": "wikitext2", "wiki": "wikitext2", "enwiki": "enwiki-sample"}
# How evaluation text is joined: GPTQ reference conventions.
_JOIN = {"wikitext2": "\n\n", "c4": " ", "ptb": " ", "enwiki-sample": "\n\n"}
_CALIBRATION = {"wikitext2": "stream", "c4": "documents", "ptb": "stream", "enwiki-sample": "documents"}


@dataclass
class TextSource:
    """Documents of one split of one text set, and how to join them into a stream for evaluation."""

    name: str
    split: str
    documents: list[str]
    join: str
    origin: str  # file path, "hf:<dataset>" or "packaged:<name>"
    notes: dict = field(default_factory=dict)
    # how calibration windows are drawn: "documents" (a random document longer than the window, then a random
    # offset: c4, enwiki, .jsonl/.parquet) or "stream" (a random offset in the joined text: sets whose rows are
    # paragraphs or sentences, wikitext2, ptb and .txt files, as the GPTQ reference samples wikitext2 and ptb)
    calibration: str = "documents"

    def joined(self) -> str:
        return self.join.join(self.documents)

    def protocol(self) -> dict:
        return {"dataset": self.name, "split": self.split, "origin": self.origin, "join": self.join,
                "documents": len(self.documents)}


def known_sets() -> list[str]:
    return sorted(_SPLITS) + ["file:PATH (.txt, .jsonl, .parquet)"]


def data_dir_from(data_dir: str | Path | None) -> Path | None:
    """The data directory: the argument, else ``$LMSHRINK_DATA``, else None."""
    value = data_dir if data_dir is not None else os.environ.get("LMSHRINK_DATA")
    if value in (None, ""):
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataSourceError(f"data directory {path} does not exist",
                              fix="pass --data-dir (or set LMSHRINK_DATA) to a folder such as ../shared/data")
    return path


def _wikitext_rows(path: Path) -> list[str]:
    # one row per line, as stored (the data README's layout): joined with "\n\n", the rows the GPTQ reference
    # evaluates (docs/decisions.md)
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _read_jsonl(path: Path, field_name: str = "text") -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataSourceError(f"{path}:{lineno} is not valid JSON ({exc.msg})",
                                      fix="use one JSON object per line") from exc
            if not isinstance(record, dict) or field_name not in record:
                raise DataSourceError(f"{path}:{lineno} has no {field_name!r} field",
                                      fix=f"give every line a {field_name!r} string field")
            if not isinstance(record[field_name], str):
                raise DataSourceError(f"{path}:{lineno}: {field_name!r} is {type(record[field_name]).__name__} "
                                      f"{str(record[field_name])[:40]!r}, not a string",
                                      fix=f"give every line a {field_name!r} string field (drop empty records)")
            docs.append(record[field_name])
    return docs


def _local_candidates(name: str, split: str, root: Path) -> list[Path]:
    if name == "wikitext2":
        return [root / "wikitext-2-raw" / f"wiki.{split}.raw"]
    if name == "c4":
        if split == "train":
            return sorted((root / "c4").glob("c4-train*.jsonl")) or [root / "c4" / "c4-train-00000-first500.jsonl"]
        return sorted((root / "c4").glob("c4-validation*.jsonl")) or [root / "c4" / "c4-validation.jsonl"]
    if name == "ptb":
        return [root / "ptb" / f"ptb.{split}.txt"]
    return []


def _read_local(name: str, path: Path) -> list[str]:
    if name == "wikitext2":
        return _wikitext_rows(path)
    if name == "c4":
        return _read_jsonl(path)
    if name == "ptb":  # one sentence per line, as in the HF ptb_text_only rows
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    raise AssertionError(name)


def _from_hub(name: str, split: str) -> tuple[list[str], str]:
    try:
        import datasets  # noqa: F401  (optional dependency)
    except ImportError as exc:
        raise ModuleNotFoundError("datasets") from exc
    from lmshrink.data.hub import load_dataset_or_cache as load_dataset

    hf_split = {"valid": "validation"}.get(split, split)
    if name == "wikitext2":
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)["text"]
        return list(rows), "hf:wikitext/wikitext-2-raw-v1"
    if name == "c4":
        shard = "en/c4-train.00000-of-01024.json.gz" if split == "train" else "en/c4-validation.00000-of-00008.json.gz"
        rows = load_dataset("allenai/c4", data_files={split: shard}, split=split)["text"]
        return list(rows), f"hf:allenai/c4/{shard}"
    if name == "ptb":
        rows = load_dataset("ptb_text_only", "penn_treebank", split=hf_split)["sentence"]
        return list(rows), "hf:ptb_text_only"
    raise AssertionError(name)


def read_text_file(path: Path) -> list[str]:
    """Documents of a .txt (blank-line separated paragraphs), .jsonl (field text) or .parquet (column text) file;
    a file without any text is an error that says so."""
    if not path.is_file():
        raise DataSourceError(f"text file {path} does not exist", fix="check the path after file:")
    documents = _read_documents(path)
    if not documents:
        what = {".jsonl": "no record with text", ".parquet": "no row with text"}.get(path.suffix.lower(),
                                                                                    "only blank lines")
        raise DataSourceError(f"text file {path} has no text ({'it is empty' if path.stat().st_size == 0 else what})",
                              fix="pass a file with text in it (file:PATH), or use a named set such as enwiki-sample")
    return documents


def _read_documents(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise DataSourceError(f"reading {path} needs pyarrow",
                                  fix="pip install -e '.[datasets]' in the lmshrink checkout") from exc
        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise DataSourceError(f"{path} has no 'text' column (columns: {', '.join(table.column_names)})",
                                  fix="name the text column 'text'")
        return [str(t) for t in table.column("text").to_pylist() if t]
    if suffix in (".txt", ".text", ".md", ".raw", ""):
        text = path.read_text(encoding="utf-8")
        return [block.strip() for block in text.split("\n\n") if block.strip()]
    raise DataSourceError(f"unsupported text file type {suffix!r} for {path}", fix="use .txt, .jsonl or .parquet")


def check_text(name: str | None, split: str) -> None:
    """Refuse at once (before any model is loaded) a text set name or split that ``load_text`` cannot resolve, and a
    ``file:PATH`` that does not exist or holds no text (read once more here: a text file is cheap to read, a model
    is not); whether a named set is in the data directory is found when it is read."""
    if name is None or name.startswith("file:"):
        if name is not None:
            read_text_file(Path(name[5:]).expanduser())
        return
    name = _ALIASES.get(name, name)
    if name not in _SPLITS:
        raise DataSourceError(f"unknown text set {name!r}", fix=f"use one of: {', '.join(known_sets())}")
    if split not in _SPLITS[name]:
        raise DataSourceError(f"{name} has no split {split!r}",
                              fix=f"use one of: {', '.join(sorted(set(_SPLITS[name])))}")


def load_text(name: str | None, split: str = "test", data_dir: str | Path | None = None) -> TextSource:
    """Resolve a text set name (or ``file:PATH``) and split to its documents.

    Named sets come from the data directory first; when absent there and the optional ``datasets``
    package is installed and the hub reachable, from Hugging Face. ``None`` means the packaged text.
    """
    if name is None:
        name = DEFAULT_TEXT
    if name.startswith("file:"):
        path = Path(name[5:]).expanduser()
        stream = path.suffix.lower() not in (".jsonl", ".parquet")  # a .txt file's documents are its paragraphs
        return TextSource(name=name, split="all", documents=read_text_file(path), join="\n\n", origin=str(path),
                          calibration="stream" if stream else "documents")
    check_text(name, split)
    name = _ALIASES.get(name, name)
    split = _SPLITS[name][split]
    if name == "enwiki-sample":
        from lmshrink.data.enwiki import load_enwiki_sample

        return TextSource(name=name, split=split, documents=load_enwiki_sample(split), join=_JOIN[name],
                          origin="packaged:gensim==4.4.0/enwiki-latest-pages-articles1 (shortened)",
                          calibration=_CALIBRATION[name])
    root = data_dir_from(data_dir)
    tried: list[Path] = []
    if root is not None:
        for path in _local_candidates(name, split, root):
            if path.is_file():
                return TextSource(name=name, split=split, documents=_read_local(name, path), join=_JOIN[name],
                                  origin=str(path), calibration=_CALIBRATION[name])
            tried.append(path)
    try:
        documents, origin = _from_hub(name, split)
    except ModuleNotFoundError:
        reason = "the optional `datasets` package is not installed"
    except HubUnavailable as exc:
        reason = f"the Hugging Face hub cannot be asked for it: {exc}"
    except Exception as exc:  # noqa: BLE001 - any hub failure means the set is unavailable here
        reason = f"the Hugging Face hub could not provide it ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    else:
        return TextSource(name=name, split=split, documents=documents, join=_JOIN[name], origin=origin,
                          calibration=_CALIBRATION[name])
    where = f"not found at {', '.join(map(str, tried))}" if tried else "no data directory was given"
    raise DataSourceError(
        f"text set {name} ({split}) is unavailable: {where}, and {reason}",
        fix="pass --data-dir (or set LMSHRINK_DATA) to a folder holding it (e.g. ../shared/data), "
        f"use file:PATH, or use the packaged text {DEFAULT_TEXT!r}",
    )
