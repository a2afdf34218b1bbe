"""A recover stage's text: documents split into training and held-out sides (seeded, whole documents), and the
token windows of each side."""

from __future__ import annotations

import random
import re
from dataclasses import replace
from typing import TYPE_CHECKING, NamedTuple

import torch

from lmshrink.core.errors import LmshrinkError
from lmshrink.data.sources import TextSource, load_text
from lmshrink.data.windows import calibration_windows, encode_text, evaluation_windows

if TYPE_CHECKING:  # the stage imports this module when it runs
    from lmshrink.methods.recover.stage import RecoverStage

HELD_OUT_MAX_FRACTION = 0.5


_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")


def _split_units(source: TextSource) -> list[list[int]]:
    """The groups of document indices that go to the same side of the split. WikiText-2's documents are its rows
    (paragraphs and headings): an article's rows stay together, an article starting at its top-level ``" = Title = "``
    row. Elsewhere each document is its own group."""
    if source.name != "wikitext2":
        return [[i] for i in range(len(source.documents))]
    units: list[list[int]] = []
    for index, row in enumerate(source.documents):
        if not units or _WIKITEXT_TITLE.match(row):
            units.append([])
        units[-1].append(index)
    return units


def split_documents(source: TextSource, tokenizer, tokens_needed: int, seed: int) -> tuple[TextSource, TextSource]:
    """Split ``source`` into (training, held-out) by whole documents (WikiText-2: whole articles), seeded: held-out
    documents are taken until they hold ``tokens_needed`` tokens, at most half of the documents."""
    docs = list(source.documents)
    units = _split_units(source)
    if len(units) < 2:
        raise LmshrinkError(f"option 'data': {source.name} has {len(units)} document(s); the recover stage needs two "
                            "or more to keep held-out documents apart from the training ones",
                            fix="use a text with several documents (e.g. wikitext2, enwiki-sample, or a file with "
                                "paragraphs separated by blank lines)")
    order = list(range(len(units)))
    random.Random(seed).shuffle(order)
    held, tokens = [], 0
    for unit in order[: max(1, int(len(units) * HELD_OUT_MAX_FRACTION))]:
        held.extend(units[unit])
        tokens += sum(len(encode_text(tokenizer, docs[index])) for index in units[unit])
        if tokens >= tokens_needed:
            break
    held_set = set(held)
    train = replace(source, documents=[d for i, d in enumerate(docs) if i not in held_set],
                    notes={**source.notes, "recover_part": "training"})
    heldout = replace(source, documents=[docs[i] for i in sorted(held_set)],
                      notes={**source.notes, "recover_part": "held-out"})
    return train, heldout


class StageWindows(NamedTuple):
    """A recover stage's text split and token windows (``stage_windows``)."""

    data_name: str
    train_src: TextSource
    held_src: TextSource
    train_ids: torch.Tensor
    eval_ids: torch.Tensor


def stage_windows(stage: RecoverStage, tokenizer, default_data: str, data_dir=None,
                  max_context: int | None = None) -> StageWindows:
    """The training and held-out windows of ``stage`` (the same for the same options and text: seeded)."""
    data_name = stage.data or default_data
    source = load_text(data_name, "train", data_dir)
    train_src, held_src = split_documents(source, tokenizer, stage.eval_windows * stage.seqlen * 2, stage.seed)
    try:
        held = evaluation_windows(tokenizer, held_src, stage.seqlen, max_context=max_context)
        train = calibration_windows(tokenizer, train_src, min(stage.steps * stage.batch, 4096), stage.seqlen,
                                    stage.seed, max_context)
    except LmshrinkError as exc:
        raise LmshrinkError(f"recover stage, option 'seqlen' = {stage.seqlen} / 'data' = {data_name!r}: {exc}",
                            fix="use a shorter seqlen or a text with longer documents") from exc
    return StageWindows(data_name, train_src, held_src, train.input_ids, held.input_ids[: stage.eval_windows])


def teacher_cache_key(stage: RecoverStage, windows: StageWindows, state_key: str = "") -> str:
    """What a top-k teacher cache was written for: the run (``state_key``), the windows, k and the temperature."""
    from lmshrink.core.digest import fingerprint

    return fingerprint("teacher-topk", state_key, stage.teacher_topk, stage.temperature, windows.train_ids,
                       windows.eval_ids)
