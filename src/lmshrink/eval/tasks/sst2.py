"""SST-2 (GLUE dev): "{sentence}\\nQuestion: Is this sentence positive or negative?\\nAnswer:", like lm-eval's ``sst2``."""

from __future__ import annotations

from pathlib import Path

from lmshrink.eval.tasks.common import choice_item
from lmshrink.eval.tasks.spec import Doc, HubSource, Item, TaskSpec


def read_local(folder: Path) -> list[Doc]:
    """dev.tsv: a "sentence<TAB>label" header, then one row per line (sentence kept verbatim, as in GLUE)."""
    with open(folder / "dev.tsv", encoding="utf-8") as handle:
        lines = [line.rstrip("\r\n") for line in handle]
    docs = []
    for line in lines[1:]:
        if not line.strip():
            continue
        sentence, label = line.rsplit("\t", 1)
        docs.append({"sentence": sentence, "label": int(label)})
    return docs


def to_item(doc: Doc) -> Item:
    context = f"{doc['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:"
    return choice_item(context, ["negative", "positive"], int(doc["label"]))


SST2 = TaskSpec(
    name="sst2", kind="multiple_choice", metrics=("acc",), folder="sst2", files=("dev.tsv",), split="validation",
    prompt='"{sentence}\\nQuestion: Is this sentence positive or negative?\\nAnswer:" -> " negative" | " positive"',
    read_local=read_local, to_item=to_item, hub=HubSource("nyu-mll/glue", "sst2", "validation"), shared=True,
)
