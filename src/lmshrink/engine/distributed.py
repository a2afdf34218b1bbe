"""Data-parallel calibration on ``torch.distributed``: the ranks of one run split the calibration batches.

Every rank runs the same command (``torchrun --nproc-per-node N -m lmshrink.cli compress ...``, or ``compress``
called on every rank inside an initialised process group). Each rank runs the blocks over its own batches of
calibration windows (batch ``b`` belongs to rank ``b % N``) and keeps their hidden states; the statistics a stage
reads are summed over the ranks before any layer is solved (in float64: see ``engine.statistics``), so every rank
holds the same numbers; each layer is solved by one rank and its result sent to the others; only rank 0 writes
the checkpoint and the output. The batches are the single-process run's batches, so the result does not depend on
the number of ranks.

``Group`` wraps the collectives the engine uses. A collective that fails because another rank stopped raises
``RankLost``, which the pipeline turns into an error naming the rank and the saved progress.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from lmshrink.core.errors import LmshrinkError


class RankLost(RuntimeError):
    """A collective failed: another rank of the group stopped (it crashed, was killed, or raised an error)."""

    def __init__(self, rank: int, world: int, what: str, cause: BaseException):
        self.rank, self.world, self.what = rank, world, what
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        super().__init__(f"rank {rank} of {world}: {what} failed ({first[:300]})")


_DTYPES = {str(t): t for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8,
                               torch.int16, torch.int32, torch.int64, torch.bool)}


def launched_by_torchrun() -> bool:
    """Whether this process is one of several ranks started by ``torchrun`` (its environment says so)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_environment(device: str, timeout_minutes: float = 60.0) -> bool:
    """Join the process group ``torchrun`` describes (gloo for CPU runs, NCCL for CUDA ones), unless one is already
    initialised or this process was not started by torchrun. Returns whether this call initialised it."""
    if not launched_by_torchrun() or not dist.is_available() or dist.is_initialized():
        return False
    cuda = torch.device(device).type == "cuda"
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    return True


def rank_device(device: str, group: "Group") -> str:
    """The compute device of this rank: ``cuda`` without an index means this rank's local GPU in a group."""
    parsed = torch.device(device)
    if group.active and parsed.type == "cuda" and parsed.index is None:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', group.rank % max(1, torch.cuda.device_count())))}"
    return device


class Group:
    """The ranks of a data-parallel run (torch.distributed's default group), or this process alone.

    A single process (``world == 1``) is a group whose collectives do nothing, so the engine runs one code path.
    """

    def __init__(self, rank: int = 0, world: int = 1, backend: str | None = None):
        self.rank = rank
        self.world = world
        self.backend = backend
        # NCCL moves tensors between GPUs; gloo between CPU buffers
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device(
            "cpu")

    @classmethod
    def current(cls) -> "Group":
        """The default process group when one is initialised with several ranks, else a single process."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size(), dist.get_backend())
        return cls()

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        return {"ranks": self.world, "backend": self.backend}

    # -- the calibration batches -------------------------------------------------------------------------------------
    def batches_of(self, rank: int, count: int) -> list[int]:
        """The batches (indices among ``count``) rank ``rank`` runs."""
        return list(range(rank, count, self.world))

    def batches(self, count: int) -> list[int]:
        return self.batches_of(self.rank, count)

    def check_batches(self, count: int, batch_size: int) -> None:
        if count < self.world:
            raise LmshrinkError(
                f"{count} calibration batch(es) of up to {batch_size} windows cannot keep {self.world} ranks busy: "
                "every rank needs at least one batch",
                fix=f"use at least {batch_size * self.world} calibration windows (--nsamples), or fewer ranks")

    # -- collectives ---------------------------------------------------------------------------------------------
    def _run(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except RuntimeError as exc:  # gloo and NCCL report a peer that went away as RuntimeError subclasses
            raise RankLost(self.rank, self.world, what, exc) from exc

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        """Reduce ``tensor`` in place over every rank: ``sum``, ``min`` or ``max``."""
        if not self.active:
            return
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        buffer = tensor if tensor.device == self.comm_device else tensor.to(self.comm_device)
        self._run(f"all_reduce ({op})", lambda: dist.all_reduce(buffer, op=ops[op]))
        if buffer is not tensor:
            tensor.copy_(buffer)

    def barrier(self) -> None:
        if self.active:
            self._run("barrier", lambda: dist.barrier())

    def _broadcast_bytes(self, payload: bytes | None, src: int) -> bytes:
        size = torch.tensor([len(payload) if self.rank == src else 0], dtype=torch.int64, device=self.comm_device)
        self._run("broadcast", lambda: dist.broadcast(size, src))
        if self.rank == src:
            buffer = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.comm_device)
        else:
            buffer = torch.empty(int(size.item()), dtype=torch.uint8, device=self.comm_device)
        if buffer.numel():
            self._run("broadcast", lambda: dist.broadcast(buffer, src))
        return payload if self.rank == src else bytes(buffer.cpu().numpy().tobytes())

    def broadcast_json(self, value: Any, src: int = 0) -> Any:
        """``value`` (JSON-friendly) of rank ``src``, on every rank."""
        if not self.active:
            return value
        payload = json.dumps(value, default=str).encode() if self.rank == src else None  # as checkpoints store
        return json.loads(self._broadcast_bytes(payload, src).decode())

    def broadcast_tensors(self, tensors: dict[str, torch.Tensor] | None, src: int) -> dict[str, torch.Tensor]:
        """The named CPU tensors of rank ``src``, on every rank (sent as their bytes, one message)."""
        if not self.active:
            return tensors
        specs = None
        if self.rank == src:
            specs = [[name, str(t.dtype), list(t.shape)] for name, t in tensors.items()]
        specs = self.broadcast_json(specs, src)
        sizes = [_nbytes(dtype, shape) for _, dtype, shape in specs]
        if self.rank == src:
            parts = [t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8) for t in tensors.values()]
            buffer = (torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)).to(self.comm_device)
        else:
            buffer = torch.empty(sum(sizes), dtype=torch.uint8, device=self.comm_device)
        if buffer.numel():
            self._run("broadcast", lambda: dist.broadcast(buffer, src))
        if self.rank == src:
            return tensors
        out, offset = {}, 0
        buffer = buffer.cpu()
        for (name, dtype, shape), size in zip(specs, sizes):
            out[name] = buffer[offset:offset + size].clone().view(_DTYPES[dtype]).reshape(shape)
            offset += size
        return out

    def broadcast_object(self, value: Any, src: int) -> Any:
        """Any picklable ``value`` of rank ``src`` (e.g. a stage's hand-over to a later stage), on every rank; sent
        between the processes of this run only."""
        if not self.active:
            return value
        holder = [value if self.rank == src else None]
        self._run("broadcast", lambda: dist.broadcast_object_list(holder, src))
        return holder[0]

    def root(self, call: Callable[[], Any]) -> Any:
        """Run ``call`` on rank 0 and give every rank its JSON-friendly return value, or raise its
        ``LmshrinkError`` on every rank (so one rank's refusal stops the whole group cleanly)."""
        if not self.active:
            return call()
        outcome = None
        if self.is_root:
            try:
                outcome = {"value": call()}
            except LmshrinkError as err:
                outcome = {"error": err.message, "fix": err.fix}
        outcome = self.broadcast_json(outcome, 0)
        if "error" in outcome:
            raise LmshrinkError(outcome["error"], fix=outcome["fix"])
        return outcome["value"]

    def check_same(self, value: str, what: str) -> None:
        """Refuse to go on unless ``value`` (e.g. the run's fingerprint) is the same on every rank."""
        if not self.active:
            return
        reference = self.broadcast_json(value, 0)
        agree = torch.tensor([int(reference == value)], dtype=torch.int64)
        self.all_reduce(agree, op="min")
        if not agree.item():
            raise LmshrinkError(f"the ranks of this run differ in {what}: every rank must run the same command",
                                fix="start every rank with the same model, recipe, calibration and options")

    # -- hidden states ---------------------------------------------------------------------------------------------
    def gather_batches(self, local: list[torch.Tensor], count: int) -> list[torch.Tensor] | None:
        """Rank 0 gets every rank's batches in their global order (``count`` in all); the others get None."""
        if not self.active:
            return list(local)
        if not self.is_root:
            self._send({str(i): t for i, t in enumerate(local)}, 0)
            return None
        out: list[torch.Tensor | None] = [None] * count
        for index, batch in zip(self.batches(count), local):
            out[index] = batch
        for rank in range(1, self.world):
            received = self._recv(rank)
            for index, key in zip(self.batches_of(rank, count), sorted(received, key=int)):
                out[index] = received[key]
        return out

    def scatter_batches(self, batches: list[torch.Tensor] | None, count: int) -> list[torch.Tensor]:
        """Each rank's own batches of ``batches`` (given on rank 0 only, in global order)."""
        if not self.active:
            return list(batches)
        if self.is_root:
            for rank in range(1, self.world):
                self._send({str(i): batches[b] for i, b in enumerate(self.batches_of(rank, count))}, rank)
            return [batches[b] for b in self.batches(count)]
        received = self._recv(0)
        return [received[key] for key in sorted(received, key=int)]

    def _send(self, tensors: dict[str, torch.Tensor], dst: int) -> None:
        specs = json.dumps([[name, str(t.dtype), list(t.shape)] for name, t in tensors.items()]).encode()
        header = torch.tensor([len(specs)], dtype=torch.int64, device=self.comm_device)
        self._run("send", lambda: dist.send(header, dst))
        self._run("send", lambda: dist.send(torch.frombuffer(bytearray(specs), dtype=torch.uint8).to(
            self.comm_device), dst))
        for t in tensors.values():
            flat = t.detach().contiguous().reshape(-1).view(torch.uint8).to(self.comm_device)
            if flat.numel():
                self._run("send", lambda: dist.send(flat, dst))

    def _recv(self, src: int) -> dict[str, torch.Tensor]:
        header = torch.empty(1, dtype=torch.int64, device=self.comm_device)
        self._run("receive", lambda: dist.recv(header, src))
        raw = torch.empty(int(header.item()), dtype=torch.uint8, device=self.comm_device)
        self._run("receive", lambda: dist.recv(raw, src))
        specs = json.loads(bytes(raw.cpu().numpy().tobytes()).decode())
        out = {}
        for name, dtype, shape in specs:
            flat = torch.empty(_nbytes(dtype, shape), dtype=torch.uint8, device=self.comm_device)
            if flat.numel():
                self._run("receive", lambda: dist.recv(flat, src))
            out[name] = flat.cpu().view(_DTYPES[dtype]).reshape(shape)
        return out


def _nbytes(dtype: str, shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count * torch.empty(0, dtype=_DTYPES[dtype]).element_size()
