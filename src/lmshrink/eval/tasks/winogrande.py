"""WinoGrande (xl dev): partial evaluation, like lm-eval's ``winogrande``.

Each option fills the blank and everything before it becomes a context; the shared rest of the sentence
(" " + text after the blank, stripped) is the continuation scored after each context.
"""

from __future__ import annotations

from pathlib import Path

from lmshrink.eval.tasks.common import TARGET_DELIMITER
from lmshrink.eval.tasks.datafiles import read_jsonl, read_lines
from lmshrink.eval.tasks.spec import Doc, HubSource, Item, TaskSpec


def from_sentence(row: Doc) -> Doc:
    """A release/hub row (sentence with "_", option1, option2, answer "1"/"2") as contexts + continuation."""
    blank = row["sentence"].index("_")
    return {
        "context_options": [row["sentence"][:blank] + row["option1"], row["sentence"][:blank] + row["option2"]],
        "continuation": row["sentence"][blank + 1:].strip(),
        "gold": {"1": 0, "2": 1}[str(row["answer"])],
    }


def read_local(folder: Path) -> list[Doc]:
    """winogrande.jsonl: either the reformatted layout (context_options, continuation, gold) or the public
    release layout (sentence, option1, option2, answer), with dev-labels.lst supplying missing answers."""
    rows = read_jsonl(folder / "winogrande.jsonl")
    labels_path = folder / "dev-labels.lst"
    labels = read_lines(labels_path) if labels_path.is_file() else None
    docs = []
    for i, row in enumerate(rows):
        if "context_options" in row:
            docs.append({"context_options": list(row["context_options"]), "continuation": row["continuation"],
                         "gold": int(row["gold"])})
        else:
            if not row.get("answer") and labels is not None:
                row = dict(row, answer=labels[i])
            docs.append(from_sentence(row))
    return docs


def to_item(doc: Doc) -> Item:
    target = TARGET_DELIMITER + doc["continuation"]
    return Item(requests=[(ctx, target) for ctx in doc["context_options"]], gold=int(doc["gold"]),
                choices=list(doc["context_options"]))


WINOGRANDE = TaskSpec(
    name="winogrande", kind="multiple_choice", metrics=("acc",), folder="winogrande",
    files=("winogrande.jsonl",), split="validation (winogrande_xl dev)",
    prompt='"{sentence up to _}{option}" -> " {rest of sentence}" (partial evaluation)',
    read_local=read_local, to_item=to_item, hub=HubSource("allenai/winogrande", "winogrande_xl", "validation"),
    from_hub=from_sentence, shared=True,
)
