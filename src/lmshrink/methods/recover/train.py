"""Knowledge distillation of the uncompressed model (teacher) into LoRA adapters on the compressed model (student).

Loss: ``T**2 * KL(softmax(teacher/T) || softmax(student/T))`` per next-token position (the teacher's logits are
computed on the fly, without gradients), plus ``lm_weight`` times the student's next-token cross-entropy. AdamW with
a cosine learning-rate decay. The text's documents are split once (seeded): held-out documents give the evaluation
windows, the others the training windows, so the held-out KL and perplexity are measured on text the adapters were
not trained on. Training stops early when the held-out KL has not improved for ``patience`` evaluations, and the
best adapters are kept.

With ``teacher_cache: topk`` the teacher runs once before training over every training window, its k largest
log-probabilities per position (at the temperature) and their token ids go to disk (``teacher_cache.py``), and
the recover stage then frees its decoder blocks. The KL is then an approximation taken over k + 1 outcomes: the k
cached tokens, and one "rest" bucket holding the teacher's remaining mass ``1 - sum(top k)`` against the student's
mass outside those k tokens. That is the KL between the two distributions with the tokens outside the teacher's top
k merged into one outcome: never more than the full KL (merging outcomes cannot increase a KL), equal to it when k is
the vocabulary size, and close to it when the teacher's mass outside its top k is small. Its gradient moves the
student's total mass outside the top k towards the teacher's, without matching how it is spread over those tokens.
The held-out KL and perplexities stay exact (from the teacher's cached held-out hidden states).
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lmshrink.core.errors import LmshrinkError
from lmshrink.methods.recover import lora
from lmshrink.methods.recover.losses import (
    distill_loss,
    head_distill_loss,
    hidden_mse,
    logits_of,
    topk_distill_loss,
    topk_head_distill_loss,
)
from lmshrink.methods.recover.memory import memory_report
from lmshrink.methods.recover.state import load_state, save_state
from lmshrink.methods.recover.teacher_cache import TopKCache, check_released, open_cache, write_cache
from lmshrink.methods.recover.text import StageWindows, stage_windows, teacher_cache_key
from lmshrink.models.adapters import get_adapter, iter_linears, linear_weight

if TYPE_CHECKING:  # the stage imports this module when it runs
    from lmshrink.methods.recover.stage import RecoverStage


class Forward:
    """Runs a causal LM (plain or PEFT-wrapped) to its final hidden states, its logits, or its block outputs."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.backbone = self.hf.base_model
        self.head = self.hf.get_output_embeddings()
        self.blocks = list(get_adapter(self.hf).blocks(self.hf))

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone(input_ids=ids, use_cache=False)[0]

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model, ids)

    @contextlib.contextmanager
    def capture(self, out: list[torch.Tensor] | None):
        """Append each decoder block's output to ``out`` while the context is open (nothing when ``out`` is None)."""
        if out is None:
            yield
            return
        handles = [b.register_forward_hook(lambda _m, _i, o: out.append(o[0] if isinstance(o, tuple) else o))
                   for b in self.blocks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


@torch.no_grad()
def _head_path(*models: Forward, ids: torch.Tensor) -> bool:
    """Whether ``head(backbone(ids))`` reproduces each model's logits (no logit scaling or soft-capping after the
    head) with a frozen ``nn.Linear`` head, so the chunked loss can be used."""
    ids = ids[:1, :16]
    for m in models:
        if not isinstance(m.head, nn.Linear) or m.head.weight.requires_grad or m.backbone is m.hf:
            return False
        expected = m.logits(ids).float()
        got = F.linear(m.hidden(ids), m.head.weight, m.head.bias).float()
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4,
                                                             atol=1e-4 * float(expected.abs().max())):
            return False
    return True


@contextlib.contextmanager
def checkpointed_blocks(blocks: list[nn.Module]):
    """Gradient checkpointing of decoder blocks while the context is open: with gradients enabled, a block keeps
    only its inputs and recomputes its activations in backward (non-reentrant ``torch.utils.checkpoint``; the model
    stays in eval mode, so no dropout and nothing random is recomputed)."""
    from torch.utils.checkpoint import checkpoint

    saved = []
    for block in blocks:
        own = block.__dict__.get("forward")
        original = block.forward

        def forward(*args, _original=original, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_original, *args, use_reentrant=False, **kwargs)
            return _original(*args, **kwargs)

        block.forward = forward
        saved.append((block, own))
    try:
        yield
    finally:
        for block, own in saved:
            if own is None:
                del block.forward
            else:
                block.forward = own


def step_loss(student: Forward, teacher: Forward, ids: torch.Tensor, stage: RecoverStage, head: bool,
              topk: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The training loss of ``stage`` on ``ids`` (KL and/or per-block hidden MSE, plus the LM loss); with ``topk``
    (the teacher's cached ``(logp, ids)`` of these windows) the KL over k + 1 outcomes, and the teacher does not
    run."""
    if topk is not None:
        if stage.loss != "kl":
            raise LmshrinkError(f"recover stage, option 'loss' = {stage.loss!r}: the top-k teacher cache has no "
                                "block outputs to compare", fix="use loss: kl with teacher_cache: topk")
        if head:
            return topk_head_distill_loss(student.hidden(ids), student.head, *topk, ids, stage.temperature,
                                          stage.lm_weight, 1.0, stage.chunk_tokens)
        return topk_distill_loss(student.logits(ids), *topk, ids, stage.temperature, stage.lm_weight)
    kl_weight = 1.0 if stage.loss in ("kl", "kl+mse") else 0.0
    mse_weight = {"kl": 0.0, "mse": 1.0, "kl+mse": stage.hidden_weight}[stage.loss]
    need_head = bool(kl_weight or stage.lm_weight)
    t_blocks: list | None = [] if mse_weight else None
    s_blocks: list | None = [] if mse_weight else None
    with torch.no_grad(), teacher.capture(t_blocks):
        t_out = teacher.hidden(ids) if head or not need_head else teacher.logits(ids)
    with student.capture(s_blocks):
        s_out = student.hidden(ids) if head or not need_head else student.logits(ids)
    loss = s_out.new_zeros((), dtype=torch.float32)
    if need_head:
        if head:
            loss = loss + head_distill_loss(s_out, t_out, student.head, teacher.head, ids, stage.temperature,
                                            stage.lm_weight, kl_weight, stage.chunk_tokens)
        else:
            loss = loss + distill_loss(s_out, t_out, ids, stage.temperature, stage.lm_weight, kl_weight)
    if mse_weight:
        loss = loss + mse_weight * hidden_mse(s_blocks, t_blocks)
    return loss


@torch.no_grad()
def held_out_metrics(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, batch: int, device, *,
                     chunk_tokens: int = 256, teacher_hidden: list[torch.Tensor] | None = None,
                     head: bool | None = None) -> dict:
    """Mean KL(teacher || student) at temperature 1, student and teacher perplexity on the held-out windows.

    Computed from the final hidden states and the output heads in chunks of ``chunk_tokens`` positions when the
    heads allow it (else from full logits); ``teacher_hidden`` (the teacher's final hidden states of each batch,
    from an earlier call's ``teacher_hidden_states``) saves the teacher's forward passes. ``head``: whether that path
    is valid, when already known (with ``teacher_hidden``, the teacher's blocks then never run).
    """
    s_fwd, t_fwd = Forward(student), Forward(teacher)
    if head is None:
        head = _head_path(s_fwd, t_fwd, ids=ids[:1].to(device))
    kl_sum = nll = nll_t = 0.0
    positions = 0
    for b, i in enumerate(range(0, len(ids), batch)):
        chunk = ids[i:i + batch].to(device)
        target = chunk[:, 1:].reshape(-1)
        if head:
            sh = s_fwd.hidden(chunk)[:, :-1].reshape(len(target), -1)
            th = (teacher_hidden[b].to(device) if teacher_hidden is not None else t_fwd.hidden(chunk))
            th = th[:, :-1].reshape(len(target), -1)
            parts = ((F.linear(sh[j:j + chunk_tokens], s_fwd.head.weight, s_fwd.head.bias),
                      F.linear(th[j:j + chunk_tokens], t_fwd.head.weight, t_fwd.head.bias), target[j:j + chunk_tokens])
                     for j in range(0, len(target), chunk_tokens))  # one chunk of logits at a time
        else:
            parts = [(logits_of(student, chunk)[:, :-1].reshape(len(target), -1),
                      logits_of(teacher, chunk)[:, :-1].reshape(len(target), -1), target)]
        for s, t, tgt in parts:
            s_logp = F.log_softmax(s.float(), -1)
            del s
            t_logp = F.log_softmax(t.float(), -1)
            del t
            nll -= float(s_logp.gather(-1, tgt.unsqueeze(-1)).sum())
            nll_t -= float(t_logp.gather(-1, tgt.unsqueeze(-1)).sum())
            p_t = t_logp.exp()
            kl_sum += float(t_logp.sub_(s_logp).mul_(p_t).sum(-1).clamp_min(0).sum())
            positions += tgt.numel()
            del s_logp, t_logp, p_t
    return {"kl": kl_sum / positions, "ppl": math.exp(nll / positions), "teacher_ppl": math.exp(nll_t / positions)}


@torch.no_grad()
def teacher_hidden_states(teacher: nn.Module, ids: torch.Tensor, batch: int, device) -> list[torch.Tensor]:
    """The teacher's final hidden states of each ``batch`` of ``ids`` (for ``held_out_metrics``)."""
    fwd = Forward(teacher)
    return [fwd.hidden(ids[i:i + batch].to(device)) for i in range(0, len(ids), batch)]


def _lr_factor(stage: RecoverStage, step: int, elapsed: float) -> float:
    """Cosine decay from 1 to 0 over the steps (step 1 at factor 1), or over ``max_seconds`` of wall time when that
    is further along."""
    progress = (step - 1) / stage.steps
    if stage.max_seconds:
        progress = max(progress, elapsed / stage.max_seconds)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def prepare_teacher_cache(teacher: nn.Module, stage: RecoverStage, windows: StageWindows, folder: Path, key: str, *,
                          reuse: bool = False, device: str | torch.device = "cpu",
                          progress: bool = False) -> TopKCache:
    """The top-k cache of ``teacher`` for ``stage`` in ``folder``: the complete one found there for ``key`` when
    ``reuse`` (a resumed run), else written now (the teacher runs once over every training and held-out window)."""
    if reuse and (found := open_cache(folder, key)) is not None:
        return found
    device = torch.device(device)
    fwd = Forward(teacher)
    check_released(fwd.blocks, "option 'teacher_cache' = 'topk'")
    teacher.to(device).eval().requires_grad_(False)
    if not _head_path(fwd, ids=windows.eval_ids[:1].to(device)):
        raise LmshrinkError("recover stage, option 'teacher_cache' = 'topk': this model's logits are not its output "
                            "head applied to its final hidden states (e.g. logit soft-capping or scaling), which the "
                            "top-k cache and its held-out evaluation rely on",
                            fix="use teacher_cache: none for this model")
    return write_cache(folder, key, fwd.hidden, fwd.head, windows.train_ids, windows.eval_ids, stage.teacher_topk,
                       stage.temperature, stage.batch, stage.chunk_tokens, device, progress)


def recover(model: nn.Module, teacher: nn.Module, tokenizer, stage: RecoverStage, results: dict, *,
            default_data: str, data_dir=None, device: str | torch.device = "cpu", progress: bool = True,
            max_context: int | None = None, adapter_out: dict | None = None, state_dir: Path | None = None,
            state_key: str = "", resume: bool = False, teacher_cache: TopKCache | None = None,
            requantize_on_grid=None, teacher_blocks: list[int] | None = None) -> dict:
    """Train LoRA adapters on ``model`` (the compressed student, changed in place) to match ``teacher``; merge them
    (updating ``results``) or, with ``merge: false``, put their PEFT files into ``adapter_out`` (file name -> bytes)
    and leave the student's weights as they were. Returns the stage's record.

    With ``state_dir``, the adapters, optimizer and counters are saved there every ``save_every`` steps and when
    training ends (tagged with ``state_key``); with ``resume``, a state found there is continued from, giving the
    same result as an uninterrupted run (unless ``max_seconds`` is set: time-based decisions are not reproducible).
    ``requantize_on_grid(model, targets)``: the engine-backed GPTQ sweep on the stored grids that ``requantize: gptq``
    merges use (``methods.recover.requant``; the pipeline provides it). ``teacher_blocks``: the teacher's block
    matching each student block, when blocks were removed (the hidden-state loss compares those pairs).

    With ``teacher_cache: topk``, ``teacher_cache`` is the stage's cache (``prepare_teacher_cache``; the teacher's
    blocks may then be freed already). Without it, the cache is written here: beside ``state_dir``
    (``<state_dir>-teacher-topk``, reused on ``resume``) or in a temporary folder removed at the end; the teacher's
    blocks are not freed then (its caller owns it: the recover stage's ``run_phase`` frees them).
    """
    if stage.teacher_cache == "topk" and teacher_cache is None:
        windows = stage_windows(stage, tokenizer, default_data, data_dir, max_context)
        key = teacher_cache_key(stage, windows, state_key)
        with contextlib.ExitStack() as stack:
            if state_dir is not None:
                folder = state_dir.with_name(state_dir.name + "-teacher-topk")
            else:
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lmshrink-teacher-"))) / "topk"
            teacher_cache = prepare_teacher_cache(teacher, stage, windows, folder, key, reuse=resume, device=device,
                                                  progress=progress)
            return _recover(model, teacher, tokenizer, stage, results, default_data=default_data, data_dir=data_dir,
                            device=device, progress=progress, max_context=max_context, adapter_out=adapter_out,
                            state_dir=state_dir, state_key=state_key, resume=resume, teacher_cache=teacher_cache,
                            requantize_on_grid=requantize_on_grid, teacher_blocks=teacher_blocks)
    return _recover(model, teacher, tokenizer, stage, results, default_data=default_data, data_dir=data_dir,
                    device=device, progress=progress, max_context=max_context, adapter_out=adapter_out,
                    state_dir=state_dir, state_key=state_key, resume=resume, teacher_cache=teacher_cache,
                    requantize_on_grid=requantize_on_grid, teacher_blocks=teacher_blocks)


def _recover(model: nn.Module, teacher: nn.Module, tokenizer, stage: RecoverStage, results: dict, *,
             default_data: str, data_dir, device, progress: bool, max_context: int | None, adapter_out: dict | None,
             state_dir: Path | None, state_key: str, resume: bool, teacher_cache: TopKCache | None,
             requantize_on_grid=None, teacher_blocks: list[int] | None = None) -> dict:
    from tqdm.auto import tqdm

    # the stage's clock (max_seconds) includes the writing of its teacher cache, as other data preparation
    started = time.perf_counter() - (teacher_cache.seconds if teacher_cache is not None else 0.0)
    device = torch.device(device)
    torch.manual_seed(stage.seed)
    names = [n for n, _ in iter_linears(model) if stage.selects(n)]
    windows = stage_windows(stage, tokenizer, default_data, data_dir, max_context)
    data_name, train_src, held_src = windows.data_name, windows.train_src, windows.held_src
    train_ids, eval_ids = windows.train_ids, windows.eval_ids
    masks = {n: m for n in names if (m := lora.pruned_mask(results.get(n))) is not None}

    teach = Forward(teacher)
    if teacher_cache is None:
        check_released(teach.blocks, "option 'teacher_cache' = 'none'")
        teacher.to(device).eval().requires_grad_(False)
    elif teacher_cache.meta["key"] != teacher_cache_key(stage, windows, state_key):  # (its blocks never run here)
        raise LmshrinkError(f"the top-k teacher cache in {teacher_cache.folder} was written for other windows or "
                            "options than this recover stage's",
                            fix=f"delete {teacher_cache.folder} and run again")
    if teacher_blocks is not None:  # hidden states are compared between the student's blocks and their sources
        teach.blocks = [teach.blocks[i] for i in teacher_blocks]
    model.to(device).eval()
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]  # PEFT freezes them; restored at the end
    full = stage.adapter == "full"
    weights_before = {n: linear_weight(model.get_submodule(n)).float().clone() for n in names} if full else {}
    peft_model = (lora.attach_full(model, names, masks, results) if full
                  else lora.attach(model, names, stage.rank, stage.alpha, masks))
    params = lora.trainable_parameters(peft_model)
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    student = Forward(peft_model)
    if teacher_cache is None:
        head = _head_path(student, teach, ids=eval_ids[:1].to(device))
        cached = teacher_hidden_states(teacher, eval_ids, stage.batch, device) if head else None
    else:  # the cache was written only for a teacher whose logits are head(final hidden states)
        head = _head_path(student, ids=eval_ids[:1].to(device))
        if not head:
            raise LmshrinkError("recover stage, option 'teacher_cache' = 'topk': the student's logits are not its "
                                "output head applied to its final hidden states",
                                fix="use teacher_cache: none for this model")
        cached = teacher_cache.held_out_hidden(stage.batch, device)

    def evaluate() -> dict:
        return held_out_metrics(peft_model, teacher, eval_ids, stage.batch, device, chunk_tokens=stage.chunk_tokens,
                                teacher_hidden=cached, head=head)

    saved = load_state(state_dir, state_key, peft_model, optimizer) if resume and state_dir is not None else None
    if saved is not None:
        history, losses, best_state = saved["history"], saved["losses"], saved["best_state"]
        before, best, best_step, stale = saved["before"], saved["best"], saved["best_step"], saved["stale"]
        first, stopped_by, elapsed_before = saved["step"] + 1, saved["stopped_by"], saved["elapsed"]
        resumed_from = saved["step"]
    else:
        before = evaluate()
        history = [{"step": 0, **before}]
        best, best_step, best_state, stale = before["kl"], 0, lora.adapter_state(peft_model), 0
        losses: list[float] = []
        first, stopped_by, elapsed_before, resumed_from = 1, None, 0.0, None

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - started

    def save(step: int) -> None:
        if state_dir is not None:
            save_state(state_dir, state_key, peft_model, optimizer, best_state,
                       {"step": step, "history": history, "losses": losses, "before": before, "best": best,
                        "best_step": best_step, "stale": stale, "stopped_by": stopped_by, "elapsed": elapsed()})

    interval = stage.eval_interval()
    step = first - 1
    bar = tqdm(total=stage.steps, initial=step, desc="recover", unit="step", disable=not progress,
               dynamic_ncols=True)
    with checkpointed_blocks(student.blocks) if stage.gradient_checkpointing else contextlib.nullcontext():
        while stopped_by is None and step < stage.steps:
            if stage.max_seconds and elapsed() >= stage.max_seconds:
                stopped_by = "max_seconds"
                if history[-1]["step"] != step:  # the adapters trained since the last evaluation get their chance
                    metrics = evaluate()
                    tail = losses[-(step - history[-1]["step"]):]
                    history.append({"step": step, "train_loss": sum(tail) / len(tail), **metrics})
                    if metrics["kl"] < best:
                        best, best_step, best_state = metrics["kl"], step, lora.adapter_state(peft_model)
                break
            step += 1
            for group in optimizer.param_groups:
                group["lr"] = stage.lr * _lr_factor(stage, step, elapsed())
            index = torch.arange((step - 1) * stage.batch, step * stage.batch) % len(train_ids)
            ids = train_ids[index].to(device)
            topk = teacher_cache.windows(index, device) if teacher_cache is not None else None
            loss = step_loss(student, teach, ids, stage, head, topk=topk)
            del topk
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            del loss
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", held_kl=f"{best:.4f}")
            if step % interval == 0 or step == stage.steps:
                metrics = evaluate()
                history.append({"step": step, "train_loss": sum(losses[-interval:]) / len(losses[-interval:]),
                                **metrics})
                if metrics["kl"] < best:
                    best, best_step, best_state, stale = metrics["kl"], step, lora.adapter_state(peft_model), 0
                else:
                    stale += 1
                    if stage.patience and stale >= stage.patience:
                        stopped_by = "early_stopping"
            if stage.save_every and step % stage.save_every == 0 and stopped_by is None and step < stage.steps:
                save(step)
    bar.close()
    stopped_by = stopped_by or "steps"
    if saved is None or step != saved["step"]:
        save(step)  # training is over: a resume from here goes straight to the merge
    train_seconds = elapsed()
    memory = memory_report(model, params, optimizer)
    lora.load_adapter_state(peft_model, best_state)
    after = evaluate() if best_step else dict(before)
    record = {
        "stage": stage.model_dump(), "layers": len(names), "pruned_layers": len(masks), "data": {
            "dataset": data_name, "training_documents": len(train_src.documents),
            "held_out_documents": len(held_src.documents), "training_windows": len(train_ids),
            "held_out_windows": len(eval_ids), "seqlen": stage.seqlen,
            "split": "seeded by whole documents (held-out documents never train)"},
        "steps_run": step, "best_step": best_step, "stopped_early": stopped_by == "early_stopping",
        "stopped_by": stopped_by, "max_seconds": stage.max_seconds, "resumed_from_step": resumed_from,
        "loss_path": ("chunked output head" if head else "full logits") + (
            ", top-k teacher cache" if teacher_cache is not None else ""),
        "held_out_before": before, "held_out_after": after, "history": history, "train_seconds": train_seconds,
        "memory": memory,
        "teacher_cache": teacher_cache.record() if teacher_cache is not None else {"mode": "none"},
    }
    if full:  # the weights were trained in place: nothing to merge
        record["merge"] = lora.finish_full(model, names, results, masks, weights_before)
        record["held_out_after_merge"] = after
    elif stage.merge:
        merged_model, record["merge"] = lora.merge(peft_model, names, results, masks, stage.requantize,
                                                   requantize_on_grid=requantize_on_grid)
        record["held_out_after_merge"] = held_out_metrics(merged_model, teacher, eval_ids, stage.batch, device,
                                                          chunk_tokens=stage.chunk_tokens, teacher_hidden=cached,
                                                          head=head)
        _check_merge_kept_gain(record, before, after, stage)
    else:
        files = lora.adapter_files(peft_model, masks)
        if adapter_out is not None:
            adapter_out.update(files)
        lora.unload(peft_model)
        record["adapter"] = {"format": "peft", "files": sorted(files), "folder": "adapter"}
    for param, flag in grad_flags:
        param.requires_grad_(flag)
    record["seconds"] = elapsed()
    final = record.get("held_out_after_merge", after)
    if progress and record.get("merge_warning"):
        print(f"recover: warning: {record['merge_warning']}", file=sys.stderr)
    record["kl_reduction"] = 1 - final["kl"] / before["kl"] if before["kl"] > 0 else None
    if progress:
        print(f"recover: held-out KL {before['kl']:.4f} -> {final['kl']:.4f}, ppl {before['ppl']:.3f} -> "
              f"{final['ppl']:.3f} (teacher {before['teacher_ppl']:.3f}); {step} steps ({stopped_by}), best at "
              f"{best_step}; {record['seconds']:.1f}s", file=sys.stderr)
    return record


# below this share of the adapters' held-out KL gain surviving the merge, the stage warns
MERGE_KEPT_WARN = 0.5


def _check_merge_kept_gain(record: dict, before: dict, after: dict, stage) -> None:
    """Record in ``record["merge"]["gain_kept"]`` the share of the adapters' held-out KL reduction that the merged
    model keeps, and warn (``record["merge_warning"]`` and a ``UserWarning``) when it is below ``MERGE_KEPT_WARN``.

    Merging into quantized layers puts the merged weights back on their grids; LoRA updates smaller than half a grid
    step round back to the old codes, so the merge can lose most of what training gained (docs/decisions.md).
    """
    gain = before["kl"] - after["kl"]
    if gain <= 0:
        return
    merged = record["held_out_after_merge"]["kl"]
    kept = (before["kl"] - merged) / gain
    record["merge"]["gain_kept"] = kept
    if kept >= MERGE_KEPT_WARN:
        return
    fixes = ["merge: false (the adapters are saved in PEFT format and applied at load time)"]
    if stage.requantize == "round" and record["merge"].get("quantized_codes_changed") is not None:
        fixes.insert(0, "requantize: gptq")
    message = (f"the merge kept {100 * kept:.0f}% of the adapters' held-out gain (KL {before['kl']:.4f} -> "
               f"{after['kl']:.4f} with the adapters, {merged:.4f} merged): the merged weights went back onto the "
               f"quantization grids, whose steps are larger than most adapter updates. Try {' or '.join(fixes)}")
    record["merge_warning"] = message
    warnings.warn(message, stacklevel=3)
