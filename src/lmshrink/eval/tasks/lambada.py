"""LAMBADA, OpenAI detokenized test set: predict the last word, like lm-eval's ``lambada_openai``."""

from __future__ import annotations

from pathlib import Path

from lmshrink.eval.tasks.datafiles import read_jsonl
from lmshrink.eval.tasks.spec import Doc, HubSource, Item, TaskSpec


def read_local(folder: Path) -> list[Doc]:
    return [{"text": row["text"]} for row in read_jsonl(folder / "lambada_test.jsonl")]


def to_item(doc: Doc) -> Item:
    """Context = all words but the last (split on " "), continuation = " " + last word."""
    words = doc["text"].split(" ")
    return Item(requests=[(" ".join(words[:-1]), " " + words[-1])])


LAMBADA_OPENAI = TaskSpec(
    name="lambada_openai", kind="loglikelihood", metrics=("acc", "perplexity"), folder="lambada",
    files=("lambada_test.jsonl",), split="test (OpenAI detokenized)",
    prompt='"{text without its last word}" -> " {last word}"; acc = every target token is the argmax',
    read_local=read_local, to_item=to_item, hub=HubSource("EleutherAI/lambada_openai", "default", "test"),
    shared=True,
)
