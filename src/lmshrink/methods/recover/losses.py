"""The distillation losses: KL at a temperature on full logits, through the output head in chunks, against a
teacher's cached top-k log-probabilities, and the per-block hidden-state MSE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmshrink.core.errors import LmshrinkError


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits for token ids ``ids`` (no key/value cache)."""
    return model(input_ids=ids, use_cache=False).logits


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor,
                 temperature: float, lm_weight: float, kl_weight: float = 1.0) -> torch.Tensor:
    """Mean over next-token positions of ``kl_weight * T**2 * KL(teacher_T || student_T)`` (+ ``lm_weight`` *
    cross-entropy), from full logits (the reference; training uses ``head_distill_loss`` when it can)."""
    s = student_logits[:, :-1].float()
    t = teacher_logits[:, :-1].float()
    loss = s.new_zeros(())
    if kl_weight:
        t_logp = F.log_softmax(t / temperature, dim=-1)
        s_logp = F.log_softmax(s / temperature, dim=-1)
        loss = loss + kl_weight * (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean() * temperature ** 2
    if lm_weight:
        loss = loss + lm_weight * F.cross_entropy(s.reshape(-1, s.shape[-1]), ids[:, 1:].reshape(-1))
    return loss


def topk_kl(student_logits: torch.Tensor, t_logp: torch.Tensor, t_ids: torch.Tensor) -> torch.Tensor:
    """Per position ``KL(teacher || student)`` over k + 1 outcomes (the k cached tokens and the rest):
    ``student_logits`` ``[..., vocab]`` (already divided by the temperature), ``t_logp`` ``[..., k + 1]`` (the teacher's top-k
    log-probabilities, then the log of its remaining mass) and ``t_ids`` ``[..., k]``. When k is the vocabulary size
    the rest bucket is empty and left out, and this is the full KL."""
    s_logp = F.log_softmax(student_logits, dim=-1)
    k = t_ids.shape[-1]
    lq = s_logp.gather(-1, t_ids)
    lp = t_logp[..., :k]
    if k < s_logp.shape[-1]:
        rest = s_logp.scatter(-1, t_ids, float("-inf")).logsumexp(-1, keepdim=True)  # log(1 - sum q[top k])
        lq = torch.cat([lq, rest], -1)
        lp = t_logp
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), 0.0).sum(-1)


def topk_distill_loss(student_logits: torch.Tensor, t_logp: torch.Tensor, t_ids: torch.Tensor, ids: torch.Tensor,
                      temperature: float, lm_weight: float, kl_weight: float = 1.0) -> torch.Tensor:
    """``distill_loss`` with the teacher given by its top-k cache (``t_logp`` ``[batch, seqlen - 1, k + 1]``, ``t_ids``
    ``[batch, seqlen - 1, k]``, at ``temperature``): the KL over k + 1 outcomes of ``topk_kl``, from full logits (the
    reference; training uses ``topk_head_distill_loss``)."""
    s = student_logits[:, :-1].float()
    loss = s.new_zeros(())
    if kl_weight:
        loss = loss + kl_weight * topk_kl(s / temperature, t_logp, t_ids).mean() * temperature ** 2
    if lm_weight:
        loss = loss + lm_weight * F.cross_entropy(s.reshape(-1, s.shape[-1]), ids[:, 1:].reshape(-1))
    return loss


def _lm_term(logits: torch.Tensor, target: torch.Tensor, lm_weight: float) -> tuple[float, torch.Tensor]:
    """``lm_weight`` x the summed next-token cross-entropy of ``logits`` (float32 ``[positions, vocab]``) and its
    gradient with respect to them (the chunked head losses below compute gradients in forward)."""
    logp = F.log_softmax(logits, dim=-1)
    rows = torch.arange(len(logits), device=logits.device)
    loss = lm_weight * -float(logp[rows, target].sum())
    grad = logp.exp_()
    grad[rows, target] -= 1
    return loss, grad.mul_(lm_weight)


def _rows_grad(grad_logits: torch.Tensor | None, n: int, weight: torch.Tensor) -> torch.Tensor | float:
    """A chunk's gradient with respect to its hidden-state rows (mean over ``n`` positions), 0 without a loss term."""
    return 0 if grad_logits is None else grad_logits.div_(n).to(weight.dtype) @ weight


def _save_hidden_grad(ctx, s_hidden: torch.Tensor, grad_rows: torch.Tensor) -> None:
    """Keep the gradient for backward: ``grad_rows`` at every position but the last (which predicts nothing)."""
    grad = torch.zeros_like(s_hidden)
    grad[:, :-1] = grad_rows.reshape(s_hidden.shape[0], -1, s_hidden.shape[-1])
    ctx.save_for_backward(grad)


class _HeadTopK(torch.autograd.Function):
    """``topk_distill_loss`` from the student's final hidden states and (frozen) output head, in chunks of ``chunk``
    positions, with the gradient with respect to the hidden states computed in forward (in place, a few
    ``[chunk, vocab]`` buffers at a time, nothing vocabulary-wide kept for backward).

    With ``z`` the student's log-probabilities at temperature T, ``q = exp(z)``, the teacher's bucket masses ``p``
    (k tokens, then the rest R) and ``P = sum(p)``, the KL's derivative with respect to ``z_v`` is ``P q_v - p_v`` for a
    top-k token and ``q_v (P - p_R / Q_R)`` for the others (``Q_R``: the student's mass outside the top k); the
    loss's, with respect to the student's logits, is T times that."""

    @staticmethod
    def forward(ctx, s_hidden, weight, bias, t_logp, t_ids, ids, temperature, kl_weight, lm_weight, chunk):
        size = s_hidden.shape[-1]
        sh = s_hidden[:, :-1].reshape(-1, size)
        tl = t_logp.reshape(-1, t_logp.shape[-1]).float()
        ti = t_ids.reshape(-1, t_ids.shape[-1])
        k = ti.shape[-1]
        target = ids[:, 1:].reshape(-1)
        n = sh.shape[0]
        grad_rows = torch.empty_like(sh) if ctx.needs_input_grad[0] else None
        total = 0.0
        for i in range(0, n, chunk):
            s = F.linear(sh[i:i + chunk], weight, bias).float()
            g = None
            if lm_weight:
                loss, g = _lm_term(s, target[i:i + chunk], lm_weight)
                total += loss
            if kl_weight:
                top_ids = ti[i:i + chunk]
                z = s.div_(temperature)
                z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))  # the student's log-probabilities
                lq = z.gather(-1, top_ids)
                rest = k < z.shape[-1]
                lp = tl[i:i + chunk] if rest else tl[i:i + chunk, :k]
                if rest:
                    z.scatter_(-1, top_ids, float("-inf"))
                    lq_rest = torch.logsumexp(z, dim=-1, keepdim=True)
                    z.scatter_(-1, top_ids, lq)
                    lq = torch.cat([lq, lq_rest], -1)
                p = lp.exp()
                total += kl_weight * temperature ** 2 * float(torch.where(p > 0, p * (lp - lq), 0.0).sum())
                if grad_rows is not None:
                    mass = p.sum(-1, keepdim=True)
                    q = z.exp_()
                    if rest:  # p_R / Q_R, its exponent capped (a float32 overflow only where q_v is ~0 anyway)
                        q.mul_(mass - (lp[:, -1:] - lq[:, -1:]).clamp_(max=80).exp_())
                    else:
                        q.mul_(mass)
                    q.scatter_(-1, top_ids, mass * lq[:, :k].exp() - p[:, :k])
                    kl_grad = q.mul_(kl_weight * temperature)  # d(T^2 KL)/d(student logits)
                    g = kl_grad if g is None else g.add_(kl_grad)
                del z, lq, p
            if grad_rows is not None:
                grad_rows[i:i + chunk] = _rows_grad(g, n, weight)
            del s, g
        if grad_rows is not None:
            _save_hidden_grad(ctx, s_hidden, grad_rows)
        return s_hidden.new_tensor(total / n, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out.to(grad.dtype),) + (None,) * 9


def topk_head_distill_loss(s_hidden: torch.Tensor, s_head: nn.Linear, t_logp: torch.Tensor, t_ids: torch.Tensor,
                           ids: torch.Tensor, temperature: float, lm_weight: float, kl_weight: float = 1.0,
                           chunk: int = 256) -> torch.Tensor:
    """``topk_distill_loss`` of ``s_head(s_hidden)``, in chunks of ``chunk`` positions (the head must be frozen)."""
    return _HeadTopK.apply(s_hidden, s_head.weight, s_head.bias, t_logp, t_ids, ids, temperature, kl_weight,
                           lm_weight, chunk)


class _HeadDistill(torch.autograd.Function):
    """The distillation loss from the final hidden states and the (frozen) output heads, computed over chunks of
    ``chunk`` positions: the ``[positions, vocab]`` logits exist one chunk at a time, and the gradient with respect
    to the student's hidden states is computed in forward (``T * (p_student - p_teacher) @ W_head`` for the KL), so
    nothing vocabulary-wide is kept for backward."""

    @staticmethod
    def forward(ctx, s_hidden, t_hidden, s_weight, s_bias, t_weight, t_bias, ids, temperature, kl_weight, lm_weight,
                chunk):
        size = s_hidden.shape[-1]
        sh = s_hidden[:, :-1].reshape(-1, size)
        th = t_hidden[:, :-1].reshape(-1, size)
        target = ids[:, 1:].reshape(-1)
        n = sh.shape[0]
        grad_rows = torch.empty_like(sh) if ctx.needs_input_grad[0] else None
        total = 0.0
        for i in range(0, n, chunk):
            s = F.linear(sh[i:i + chunk], s_weight, s_bias).float()
            g = None
            if lm_weight:
                loss, g = _lm_term(s, target[i:i + chunk], lm_weight)
                total += loss
            if kl_weight:
                t = F.linear(th[i:i + chunk], t_weight, t_bias).float().div_(temperature)
                t_logp = t.sub_(torch.logsumexp(t, dim=-1, keepdim=True))
                p_t = t_logp.exp()
                s_logp = s.div_(temperature)
                s_logp.sub_(torch.logsumexp(s_logp, dim=-1, keepdim=True))
                total += kl_weight * temperature ** 2 * float(t_logp.sub_(s_logp).mul_(p_t).sum())
                del t_logp, t
                kl_grad = s_logp.exp_().sub_(p_t).mul_(kl_weight * temperature)  # d(T^2 KL)/d(student logits)
                g = kl_grad if g is None else g.add_(kl_grad)
                del p_t
            if grad_rows is not None:
                grad_rows[i:i + chunk] = _rows_grad(g, n, s_weight)
            del s, g
        if grad_rows is not None:
            _save_hidden_grad(ctx, s_hidden, grad_rows)
        return s_hidden.new_tensor(total / n, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out.to(grad.dtype),) + (None,) * 10


def head_distill_loss(s_hidden: torch.Tensor, t_hidden: torch.Tensor, s_head: nn.Linear, t_head: nn.Linear,
                      ids: torch.Tensor, temperature: float, lm_weight: float, kl_weight: float = 1.0,
                      chunk: int = 256) -> torch.Tensor:
    """``distill_loss`` of ``s_head(s_hidden)`` and ``t_head(t_hidden)``, in chunks of ``chunk`` positions (the
    heads must be frozen: no gradient reaches their weights)."""
    return _HeadDistill.apply(s_hidden, t_hidden.detach(), s_head.weight, s_head.bias, t_head.weight, t_head.bias,
                              ids, temperature, kl_weight, lm_weight, chunk)


def hidden_mse(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over decoder blocks of ``mean((h_student - h_teacher)**2) / var(h_teacher)`` (block outputs)."""
    if len(student) != len(teacher) or not student:
        raise LmshrinkError(f"recover stage, option 'loss': captured {len(student)} student and {len(teacher)} "
                            "teacher block outputs (expected the same number, one per decoder block)",
                            fix="use loss: kl for this model")
    terms = [F.mse_loss(s.float(), t.float()) / t.float().var().clamp_min(1e-12) for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()
