"""lm-eval's multiple-choice request shape, shared by the task definitions."""

from __future__ import annotations

from lmshrink.eval.tasks.spec import Item

# lm-eval's default target_delimiter: placed between the context and each choice.
TARGET_DELIMITER = " "


def choice_item(context: str, choices: list[str], gold: int) -> Item:
    """One context scored against each choice (lm-eval's multiple_choice with a single input)."""
    return Item(requests=[(context, TARGET_DELIMITER + c) for c in choices], gold=gold, choices=list(choices))
