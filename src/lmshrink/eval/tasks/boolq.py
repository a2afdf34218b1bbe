"""BoolQ (validation): "{passage}\\nQuestion: {question}?\\nAnswer:" -> " no" | " yes", like lm-eval's ``boolq``."""

from __future__ import annotations

from pathlib import Path

from lmshrink.eval.tasks.common import choice_item
from lmshrink.eval.tasks.datafiles import read_jsonl
from lmshrink.eval.tasks.spec import Doc, HubSource, Item, TaskSpec


def _label(value) -> int:
    """SuperGLUE/BoolQ labels come as JSON booleans, "true"/"false" strings or 0/1."""
    if isinstance(value, str):
        return 1 if value.strip().lower() in ("true", "1", "yes") else 0
    return int(bool(value))


def read_local(folder: Path) -> list[Doc]:
    """val.jsonl rows (SuperGLUE copy: label; original BoolQ dev: answer)."""
    return [{"question": row["question"], "passage": row["passage"],
             "label": _label(row["label"] if "label" in row else row["answer"])}
            for row in read_jsonl(folder / "val.jsonl")]


def to_item(doc: Doc) -> Item:
    return choice_item(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], _label(doc["label"]))


BOOLQ = TaskSpec(
    name="boolq", kind="multiple_choice", metrics=("acc",), folder="boolq", files=("val.jsonl",),
    split="validation", prompt='"{passage}\\nQuestion: {question}?\\nAnswer:" -> " no" | " yes"',
    read_local=read_local, to_item=to_item, hub=HubSource("aps/super_glue", "boolq", "validation"), shared=True,
)
