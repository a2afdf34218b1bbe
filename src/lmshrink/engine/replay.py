"""Reuse work between the passes of one block (true-sequential collection and the final forward).

With true-sequential stages a block is run several times over the same calibration windows: to collect the
inputs of q,k,v; of o (after q,k,v are compressed); of gate,up (after o); of down (after gate,up); and once more
to produce the next block's inputs. Most of each pass repeats the previous one exactly. ``PassMemo`` skips that
repetition for the *containers* of the block (the modules holding a group of linears, e.g. ``self_attn`` and
``mlp``), per batch of windows:

* a container whose input and weights did not change since a finished run returns that run's output;
* a container whose input did not change and whose only changed layer is its *last* linear (o_proj, down_proj)
  returns that linear applied to its saved input: attention is not recomputed to apply a new o_proj.

The second shortcut is only valid if the container's output *is* its last linear's output (nothing after it:
no residual, no dropout in training mode, no extra outputs). ``PassMemo`` checks that on the first full run of
each container in the engine run (``torch.equal`` of the two tensors, other outputs all None) and otherwise
never uses it. The computation done is the same as without the memo, on the same tensors, so results are
bit-identical (tested); only repeated work is skipped.

Validity follows from the pass schedule: the block input of a batch is the same in every pass, and a pass differs
from the one before only in the groups the previous pass's stage changed. A container holding groups
``first..last`` depends on groups ``0..last``; its last linear's input on groups ``0..last-1``. What a pass saves
is kept for the next pass only if the changes made after this pass leave it valid (and dropped otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class _Container:
    name: str
    module: nn.Module
    first_group: int
    last_group: int  # index of the block's last group inside this container
    last_linear: nn.Module | None  # the single linear of that group, when the group has one member
    outputs: dict[int, object] = field(default_factory=dict)  # batch -> output (valid for this pass)
    last_inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # batch -> input of last_linear


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class PassMemo:
    """Installed on one block while the engine runs its passes; ``begin_pass``/``set_batch`` drive it.

    ``verified`` is shared across blocks (keyed by container name): ``(valid, rest)``, whether the last-linear
    shortcut is valid for that container (decided on its first full run) and the container's other outputs (all
    None) when it returns a tuple.
    """

    def __init__(self, block: nn.Module, groups: list[list[str]], verified: dict[str, tuple[bool, tuple | None]]):
        self.block = block
        self.groups = groups
        self.verified = verified
        self.changes: set[int] | None = set()
        self.final = False
        self.keep = True
        self.batch = 0
        self.containers: list[_Container] = []
        self.skipped_runs = 0
        self.shortcut_runs = 0
        names: dict[str, int] = {}
        for index, group in enumerate(groups):
            parents = {_parent(n) for n in group}
            if len(parents) != 1:
                continue
            parent = parents.pop()
            if not parent:  # linears directly in the block (OPT fc1/fc2): nothing to reuse
                continue
            names[parent] = index
        for name, last in names.items():
            first = min(i for i, g in enumerate(groups) if {_parent(n) for n in g} == {name})
            members = [n for g in groups[first:last + 1] for n in g]
            if any(_parent(n) != name for n in members):
                continue  # groups of this container are interleaved with others: keep it simple, no memo
            last_group = groups[last]
            linear = block.get_submodule(last_group[0]) if len(last_group) == 1 else None
            self.containers.append(_Container(name, block.get_submodule(name), first, last, linear))
        self._handles = []

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def __enter__(self) -> PassMemo:
        for c in self.containers:
            original = c.module.forward

            def forward(*args, _c=c, _original=original, **kwargs):
                return self._call(_c, _original, args, kwargs)

            c.module.forward = forward
            if c.last_linear is not None:
                def pre_hook(_module, args, _c=c):
                    if self._keep_last_input(_c):
                        _c.last_inputs[self.batch] = args[0]
                self._handles.append(c.last_linear.register_forward_pre_hook(pre_hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for c in self.containers:
            del c.module.forward  # back to the class's forward
            c.outputs.clear()
            c.last_inputs.clear()

    def begin_pass(self, changes: set[int] | None, keep: bool = True) -> None:
        """A pass starts; ``changes``: the groups (indices into ``groups``) whose inputs this pass collects and
        that will be changed after it, or None for the final forward (nothing after it). A container holding a
        collected group always runs in full, so every hook inside it fires. ``keep=False``: no pass follows this
        one on this block (its saved work is still used, nothing new is saved)."""
        self.changes = changes
        self.final = changes is None
        self.keep = keep

    def end_pass(self) -> None:
        """The pass is over (its changes are about to be made): drop what they invalidate."""
        for c in self.containers:
            if not self._survives(c.last_group + 1):
                c.outputs.clear()
            if not self._survives(c.last_group):
                c.last_inputs.clear()

    def set_batch(self, batch: int) -> None:
        self.batch = batch

    # -- decisions ---------------------------------------------------------------------------------------------
    def _survives(self, deps: int) -> bool:
        """Whether something that depends on groups ``0..deps-1`` stays valid into the next pass."""
        return not self.final and self.keep and not any(g < deps for g in self.changes)

    def _keep_output(self, c: _Container) -> bool:
        return self._survives(c.last_group + 1)

    def _keep_last_input(self, c: _Container) -> bool:
        return self._survives(c.last_group) and not self._keep_output(c)

    def _call(self, c: _Container, original, args, kwargs):
        if not self.final and any(c.first_group <= g <= c.last_group for g in self.changes):
            return original(*args, **kwargs)
        cached = c.outputs.get(self.batch)
        if cached is not None:
            self.skipped_runs += 1
            return cached
        saved = c.last_inputs.get(self.batch)
        valid, rest = self.verified.get(c.name, (False, None))
        if saved is not None and valid:
            out = c.last_linear(saved)
            result = out if rest is None else (out,) + rest
            self.shortcut_runs += 1
        else:
            captured = {}
            handle = None
            if c.last_linear is not None and c.name not in self.verified:
                handle = c.last_linear.register_forward_hook(
                    lambda _m, _a, output: captured.__setitem__("out", output))
            try:
                result = original(*args, **kwargs)
            finally:
                if handle is not None:
                    handle.remove()
            if "out" in captured:
                self._verify(c, result, captured["out"])
        if self._keep_output(c):
            c.outputs[self.batch] = result
            c.last_inputs.pop(self.batch, None)
        return result

    def _verify(self, c: _Container, result, linear_out: torch.Tensor) -> None:
        if isinstance(result, (tuple, list)):
            rest = tuple(result[1:])
            ok = all(r is None for r in rest) and isinstance(result, tuple)
        else:
            rest, ok = None, True
        head = _first(result)
        ok = ok and isinstance(head, torch.Tensor) and head.shape == linear_out.shape and bool(
            torch.equal(head, linear_out))
        self.verified[c.name] = (ok, rest if ok else None)
