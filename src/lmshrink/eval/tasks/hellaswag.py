"""HellaSwag (validation), from the public hellaswag_val.jsonl, with lm-eval's preprocessing."""

from __future__ import annotations

import re
from pathlib import Path

from lmshrink.eval.tasks.common import choice_item
from lmshrink.eval.tasks.datafiles import read_jsonl
from lmshrink.eval.tasks.spec import Doc, HubSource, Item, TaskSpec


def preprocess(text: str) -> str:
    """lm-eval's clean-up: strip, WikiHow "[title]" -> ". ", drop other [brackets], collapse double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_local(folder: Path) -> list[Doc]:
    return read_jsonl(folder / "hellaswag_val.jsonl")


def to_item(doc: Doc) -> Item:
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = preprocess(doc["activity_label"] + ": " + context)
    return choice_item(query, [preprocess(e) for e in doc["endings"]], int(doc["label"]))


HELLASWAG = TaskSpec(
    name="hellaswag", kind="multiple_choice", metrics=("acc", "acc_norm"), folder="hellaswag",
    files=("hellaswag_val.jsonl",), split="validation",
    prompt='"{activity_label}: {ctx_a} {ctx_b.capitalize()}" (cleaned) -> " {ending}" for each ending',
    read_local=read_local, to_item=to_item, hub=HubSource("Rowan/hellaswag", None, "validation"),
)
