"""ARC-Easy / ARC-Challenge (test) and OpenBookQA (test), from the AI2 JSON-lines releases, like lm-eval."""

from __future__ import annotations

from pathlib import Path

from lmshrink.eval.tasks.common import choice_item
from lmshrink.eval.tasks.datafiles import read_jsonl
from lmshrink.eval.tasks.spec import Doc, HubSource, Item, TaskSpec


def _from_release(row: Doc) -> Doc:
    """An AI2 release row ({question: {stem, choices: [{text, label}]}, answerKey}) in the hub's layout."""
    question = row["question"]
    return {
        "id": row.get("id"),
        "question": question["stem"],
        "question_stem": question["stem"],
        "choices": {"text": [c["text"] for c in question["choices"]],
                    "label": [c["label"] for c in question["choices"]]},
        "answerKey": row["answerKey"],
    }


def _reader(filename: str):
    def read_local(folder: Path) -> list[Doc]:
        return [_from_release(row) for row in read_jsonl(folder / filename)]
    return read_local


def arc_item(doc: Doc) -> Item:
    """lm-eval arc: "Question: {question}\\nAnswer:" -> " {choice}"; gold = index of answerKey in the labels."""
    gold = doc["choices"]["label"].index(doc["answerKey"])
    return choice_item(f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"], gold)


def openbookqa_item(doc: Doc) -> Item:
    """lm-eval openbookqa: the bare question stem -> " {choice}"."""
    gold = doc["choices"]["label"].index(doc["answerKey"].lstrip())
    return choice_item(doc["question_stem"], doc["choices"]["text"], gold)


_ARC_PROMPT = '"Question: {question}\\nAnswer:" -> " {choice}" for each choice'

ARC_EASY = TaskSpec(
    name="arc_easy", kind="multiple_choice", metrics=("acc", "acc_norm"), folder="arc-easy",
    files=("ARC-Easy-Test.jsonl",), split="test", prompt=_ARC_PROMPT,
    read_local=_reader("ARC-Easy-Test.jsonl"), to_item=arc_item,
    hub=HubSource("allenai/ai2_arc", "ARC-Easy", "test"), shared=True,
)

ARC_CHALLENGE = TaskSpec(
    name="arc_challenge", kind="multiple_choice", metrics=("acc", "acc_norm"), folder="arc-challenge",
    files=("ARC-Challenge-Test.jsonl",), split="test", prompt=_ARC_PROMPT,
    read_local=_reader("ARC-Challenge-Test.jsonl"), to_item=arc_item,
    hub=HubSource("allenai/ai2_arc", "ARC-Challenge", "test"),
)

OPENBOOKQA = TaskSpec(
    name="openbookqa", kind="multiple_choice", metrics=("acc", "acc_norm"), folder="openbookqa",
    files=("test.jsonl",), split="test (main)", prompt='"{question_stem}" -> " {choice}" for each choice',
    read_local=_reader("test.jsonl"), to_item=openbookqa_item,
    hub=HubSource("allenai/openbookqa", "main", "test"),
)
