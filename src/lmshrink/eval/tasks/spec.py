"""What a task is: how its documents become (context, continuation) requests and how they are scored."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

Doc = dict[str, Any]


@dataclass
class Item:
    """One scored example: the requests to score, the gold choice and the choice strings used by acc_norm."""

    requests: list[tuple[str, str]]  # (context, continuation) pairs, one per choice
    gold: int = 0
    choices: list[str] = field(default_factory=list)  # lm-eval's doc_to_choice strings (acc_norm divides by len)


@dataclass(frozen=True)
class HubSource:
    """Where lm-eval reads the task from on the Hugging Face hub (used only when the local file is absent)."""

    path: str
    name: str | None
    split: str


@dataclass(frozen=True)
class TaskSpec:
    """A task: its local files, how to read them, how a document becomes an Item, and its metrics.

    ``kind`` is "multiple_choice" (acc, and acc_norm when listed) or "loglikelihood" (LAMBADA: acc of greedy
    whole-target prediction and perplexity).
    """

    name: str
    kind: str
    metrics: tuple[str, ...]
    folder: str  # sub-folder of the data directory
    files: tuple[str, ...]  # files read from that folder (the first one names the split)
    split: str  # human description of the split, for the protocol record
    prompt: str  # lm-eval's doc_to_text / doc_to_choice, for the protocol record
    read_local: Callable[[Path], list[Doc]]
    to_item: Callable[[Doc], Item]
    hub: HubSource | None = None
    from_hub: Callable[[Doc], Doc] = lambda row: dict(row)
    shared: bool = False  # has data in the project's shared data folder ("all" runs these)
