"""PIQA (validation): "Question: {goal}\\nAnswer:" scored against sol1 / sol2, like lm-eval's ``piqa``."""

from __future__ import annotations

from pathlib import Path

from lmshrink.core.errors import DataSourceError
from lmshrink.eval.tasks.common import choice_item
from lmshrink.eval.tasks.datafiles import read_jsonl, read_lines
from lmshrink.eval.tasks.spec import Doc, HubSource, Item, TaskSpec


def read_local(folder: Path) -> list[Doc]:
    """valid.jsonl rows with their label from valid-labels.lst (the public release layout)."""
    rows = read_jsonl(folder / "valid.jsonl")
    labels = read_lines(folder / "valid-labels.lst")
    if len(rows) != len(labels):
        raise DataSourceError(f"{folder}: valid.jsonl has {len(rows)} rows but valid-labels.lst {len(labels)}",
                              fix="use the files of the same PIQA release")
    return [dict(row, label=int(label)) for row, label in zip(rows, labels)]


def to_item(doc: Doc) -> Item:
    return choice_item(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


PIQA = TaskSpec(
    name="piqa", kind="multiple_choice", metrics=("acc", "acc_norm"), folder="piqa",
    files=("valid.jsonl", "valid-labels.lst"), split="validation",
    prompt='"Question: {goal}\\nAnswer:" -> " {sol1}" | " {sol2}"',
    read_local=read_local, to_item=to_item, hub=HubSource("baber/piqa", None, "validation"), shared=True,
)
