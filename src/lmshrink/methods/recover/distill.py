"""Knowledge distillation of the uncompressed model (teacher) into LoRA adapters on the compressed model (student).

Loss: ``T**2 * KL(softmax(teacher/T) || softmax(student/T))`` per next-token position (the teacher's logits are
computed on the fly, without gradients), plus ``lm_weight`` times the student's next-token cross-entropy. AdamW with
a cosine learning-rate decay. The text's documents are split once (seeded): held-out documents give the evaluation
windows, the others the training windows, so the held-out KL and perplexity are measured on text the adapters were
not trained on. Training stops early when the held-out KL has not improved for ``patience`` evaluations, and the
best adapters are kept.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ...data import calibration_windows, evaluation_windows, load_text
from ...data.sources import TextSource
from ...data.windows import _encode
from ...errors import LmshrinkError
from ...models.adapters import iter_linears
from ...recipe import RecoverStage
from . import lora
from .memory import memory_report

HELD_OUT_MAX_FRACTION = 0.5


def split_documents(source: TextSource, tokenizer, tokens_needed: int, seed: int) -> tuple[TextSource, TextSource]:
    """Split ``source`` into (training, held-out) by whole documents, seeded: held-out documents are taken until they
    hold ``tokens_needed`` tokens, at most half of the documents."""
    docs = list(source.documents)
    if len(docs) < 2:
        raise LmshrinkError(f"option 'data': {source.name} has {len(docs)} document(s); the recover stage needs two "
                            "or more to keep held-out documents apart from the training ones",
                            fix="use a text with several documents (e.g. wikitext2, enwiki-sample, or a file with "
                                "paragraphs separated by blank lines)")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    held, tokens = [], 0
    for index in order[: max(1, int(len(docs) * HELD_OUT_MAX_FRACTION))]:
        held.append(index)
        tokens += len(_encode(tokenizer, docs[index]))
        if tokens >= tokens_needed:
            break
    held_set = set(held)
    train = replace(source, documents=[d for i, d in enumerate(docs) if i not in held_set],
                    notes={**source.notes, "recover_part": "training"})
    heldout = replace(source, documents=[docs[i] for i in sorted(held_set)],
                      notes={**source.notes, "recover_part": "held-out"})
    return train, heldout


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor,
                 temperature: float, lm_weight: float) -> torch.Tensor:
    """Mean over next-token positions of ``T**2 * KL(teacher_T || student_T)`` (+ ``lm_weight`` * cross-entropy)."""
    s = student_logits[:, :-1].float()
    t = teacher_logits[:, :-1].float()
    t_logp = F.log_softmax(t / temperature, dim=-1)
    s_logp = F.log_softmax(s / temperature, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean() * temperature ** 2
    if lm_weight:
        kl = kl + lm_weight * F.cross_entropy(s.reshape(-1, s.shape[-1]), ids[:, 1:].reshape(-1))
    return kl


@torch.no_grad()
def held_out_metrics(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, batch: int, device) -> dict:
    """Mean KL(teacher || student) at temperature 1, student and teacher perplexity on the held-out windows."""
    kl_sum = nll = nll_t = 0.0
    positions = 0
    for i in range(0, len(ids), batch):
        chunk = ids[i:i + batch].to(device)
        s = _logits(student, chunk)[:, :-1].float()
        t = _logits(teacher, chunk)[:, :-1].float()
        s_logp, t_logp = F.log_softmax(s, -1), F.log_softmax(t, -1)
        kl_sum += float((t_logp.exp() * (t_logp - s_logp)).sum(-1).clamp_min(0).sum())
        target = chunk[:, 1:].unsqueeze(-1)
        nll -= float(s_logp.gather(-1, target).sum())
        nll_t -= float(t_logp.gather(-1, target).sum())
        positions += target.numel()
    return {"kl": kl_sum / positions, "ppl": math.exp(nll / positions), "teacher_ppl": math.exp(nll_t / positions)}


def recover(model: nn.Module, teacher: nn.Module, tokenizer, stage: RecoverStage, results: dict, *,
            default_data: str, data_dir=None, device: str | torch.device = "cpu", progress: bool = True,
            max_context: int | None = None, adapter_out: dict | None = None) -> dict:
    """Train LoRA adapters on ``model`` (the compressed student, changed in place) to match ``teacher``; merge them
    (updating ``results``) or, with ``merge: false``, put their PEFT files into ``adapter_out`` (file name -> bytes)
    and leave the student's weights as they were. Returns the stage's record."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    device = torch.device(device)
    torch.manual_seed(stage.seed)
    names = [n for n, _ in iter_linears(model) if stage.selects(n)]
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
    eval_ids = held.input_ids[: stage.eval_windows]
    masks = {n: m for n in names if (m := lora.pruned_mask(results.get(n))) is not None}

    teacher.to(device).eval().requires_grad_(False)
    model.to(device).eval()
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]  # PEFT freezes them; restored at the end
    peft_model = lora.attach(model, names, stage.rank, stage.alpha, masks)
    params = lora.trainable_parameters(peft_model)
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, stage.steps) / stage.steps)))

    before = held_out_metrics(peft_model, teacher, eval_ids, stage.batch, device)
    history = [{"step": 0, **before}]
    best, best_step, best_state, stale = before["kl"], 0, lora.adapter_state(peft_model), 0
    interval = stage.eval_interval()
    losses: list[float] = []
    stopped_early = False
    step = 0
    bar = tqdm(total=stage.steps, desc="recover", unit="step", disable=not progress, dynamic_ncols=True)
    for step in range(1, stage.steps + 1):
        index = torch.arange((step - 1) * stage.batch, step * stage.batch) % len(train.input_ids)
        ids = train.input_ids[index].to(device)
        with torch.no_grad():
            teacher_logits = _logits(teacher, ids)
        loss = distill_loss(_logits(peft_model, ids), teacher_logits, ids, stage.temperature, stage.lm_weight)
        del teacher_logits
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", held_kl=f"{best:.4f}")
        if step % interval == 0 or step == stage.steps:
            metrics = held_out_metrics(peft_model, teacher, eval_ids, stage.batch, device)
            history.append({"step": step, "train_loss": sum(losses[-interval:]) / len(losses[-interval:]),
                            **metrics})
            if metrics["kl"] < best:
                best, best_step, best_state, stale = metrics["kl"], step, lora.adapter_state(peft_model), 0
            else:
                stale += 1
                if stage.patience and stale >= stage.patience:
                    stopped_early = True
                    break
    bar.close()
    memory = memory_report(model, params, optimizer)
    lora.load_adapter_state(peft_model, best_state)
    after = held_out_metrics(peft_model, teacher, eval_ids, stage.batch, device) if best_step else dict(before)
    train_seconds = time.perf_counter() - started
    record = {
        "stage": stage.model_dump(), "layers": len(names), "pruned_layers": len(masks), "data": {
            "dataset": data_name, "training_documents": len(train_src.documents),
            "held_out_documents": len(held_src.documents), "training_windows": len(train.input_ids),
            "held_out_windows": len(eval_ids), "seqlen": stage.seqlen,
            "split": "seeded by whole documents (held-out documents never train)"},
        "steps_run": step, "best_step": best_step, "stopped_early": stopped_early, "held_out_before": before,
        "held_out_after": after, "history": history, "train_seconds": train_seconds, "memory": memory,
    }
    if stage.merge:
        merged_model, record["merge"] = lora.merge(peft_model, names, results, masks)
        record["held_out_after_merge"] = held_out_metrics(merged_model, teacher, eval_ids, stage.batch, device)
    else:
        files = lora.adapter_files(peft_model, masks)
        if adapter_out is not None:
            adapter_out.update(files)
        lora.unload(peft_model)
        record["adapter"] = {"format": "peft", "files": sorted(files), "folder": "adapter"}
    for param, flag in grad_flags:
        param.requires_grad_(flag)
    record["seconds"] = time.perf_counter() - started
    final = record.get("held_out_after_merge", after)
    record["kl_reduction"] = 1 - final["kl"] / before["kl"] if before["kl"] > 0 else None
    if progress:
        print(f"recover: held-out KL {before['kl']:.4f} -> {final['kl']:.4f}, ppl {before['ppl']:.3f} -> "
              f"{final['ppl']:.3f} (teacher {before['teacher_ppl']:.3f}); {step} steps, best at {best_step}"
              f"{', stopped early' if stopped_early else ''}; {record['seconds']:.1f}s", file=sys.stderr)
    return record

