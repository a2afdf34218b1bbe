"""The stage protocol: what a compression stage declares to the engine, and the registry of stage types.

A recipe is an ordered list of stages. Each stage type is a pydantic model of its options that also says

* its **scope** — ``layer``: ``solve`` is called once per selected linear layer with that layer's statistics;
  ``block``: ``solve_block`` is called once per decoder block with the block, its calibration inputs and a way to
  collect statistics on it; ``model``: no per-block solve, only the model-wide hooks below;
* the **statistics** it needs (``needs``: names from ``Stat``); the engine collects exactly those, in the passes it
  runs anyway, with the same streaming, resume and pass reuse for every stage;
* whether a layer stage's statistics are **re-collected after each group** of layers is solved
  (``sequential``), or collected once for the whole block;
* optional model-wide hooks every scope may use: ``before_blocks`` (a dense statistics pass over every block,
  changes to tensors outside the blocks, per-block options for any stage) and ``transform_block`` (applied to
  each block whenever the engine materialises it, before any statistic is taken from it).

The engine owns what one stage leaves for a later one in the same block (a mask, a grid) and hands it over in
``LayerJob.state`` / ``BlockJob.state``; there are no module globals. Stage types register themselves with
``register_stage``; the engine dispatches on ``scope`` and never imports a method. This module is torch-free so
recipes parse (and the CLI lists them) without loading the numerical libraries; the job types the engine passes
are described here as protocols.
"""

from __future__ import annotations

import enum
import fnmatch
import re
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # the engine's job objects carry torch tensors and modules
    import torch
    from torch import nn

DEFAULT_IGNORE = ["lm_head", "*embed*"]
# the hand-over key under which the engine leaves a layer's latest result for the later stages of its block
LAST_RESULT = "result"


class Scope(str, enum.Enum):
    LAYER = "layer"
    BLOCK = "block"
    MODEL = "model"


class Stat(str, enum.Enum):
    """Statistics of a linear layer's calibration inputs that the engine can collect for a stage."""

    HESSIAN = "hessian"  # H = (2/n) X~^T X~ of the layer's inputs in the model being compressed, and token count
    FP_TARGET = "fp_target"  # C = X^T X~ and X^T X, X: the same layer's inputs in the uncompressed model
    CHANNELS = "channels"  # per input channel: sum, sum of squares, sum of |x|, min, max (and the token count)


def match(pattern: str, name: str) -> bool:
    """A module-name pattern: ``re:REGEX`` (full match), else a glob on the full name or on its last part."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern)


class StageBase(BaseModel):
    """Options every stage has (which linear layers of the decoder blocks it touches), and the protocol's
    defaults: a layer stage that needs no statistic."""

    model_config = ConfigDict(extra="forbid")
    scope: ClassVar[Scope] = Scope.LAYER
    # a one-line summary for listings; a stage type that changes weights says what it does to them
    summary: ClassVar[str] = ""
    # the options shown first when the stage is written out (the rest follow in declaration order)
    leading_options: ClassVar[tuple[str, ...]] = ()
    # whether the stage gives the same result on every rank of a data-parallel run (None: by scope). Layer and model
    # stages read statistics the engine sums over the ranks; a block stage sees its rank's calibration batches
    # (BlockJob.inputs), so it must sum what it computes from them with BlockJob.all_reduce and set this to True
    data_parallel: ClassVar[bool | None] = None

    method: str
    targets: list[str] = Field(default_factory=lambda: ["*"],
                               description="module-name patterns (glob, or 're:' regex) of the layers to compress")
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE),
                              description="module-name patterns to leave alone")

    def selects(self, name: str) -> bool:
        return any(match(p, name) for p in self.targets) and not any(match(p, name) for p in self.ignore)

    def inapplicable_options(self) -> set[str]:
        """Options that have no effect with this stage's other settings (left out when it is written out)."""
        return set()

    def describe(self) -> dict[str, Any]:
        """The options as a recipe file holds them: the method, the leading options, the others in declaration
        order, then which layers it touches; unset (None) and inapplicable options are left out."""
        values = self.model_dump()
        skip = self.inapplicable_options() | {"method", "targets", "ignore"}
        names = [*self.leading_options, *(n for n in values if n not in self.leading_options)]
        own = {n: values[n] for n in names if n not in skip and values.get(n) is not None}
        return {"method": self.method, **own, "targets": values["targets"], "ignore": values["ignore"]}

    # -- what the engine asks ------------------------------------------------------------------------------------
    def supports_data_parallel(self) -> bool:
        """Whether this stage may run under data-parallel calibration (see ``data_parallel``)."""
        return self.data_parallel if self.data_parallel is not None else self.scope is not Scope.BLOCK

    def needs(self) -> frozenset[Stat]:
        """The statistics this stage reads; none means no collection pass for it."""
        return frozenset()

    @property
    def fp_target_projected(self) -> bool:
        """The stage reads ``Stat.FP_TARGET`` only through each layer's own uncompressed weight W (``W C`` and
        ``||W X||^2``), so the engine may hand it those per layer instead of the group's matrices
        (``DriftStats.projected``) where that is cheaper; and it reads ``||W X||^2`` only for its record, so the
        engine may give that after the solve: ``output_norm`` is then None, the solve leaves
        ``PENDING_OUTPUT_NORM`` in its record, and the engine calls ``complete_output_error`` later in the block."""
        return False

    @property
    def sequential(self) -> bool:
        """Layer scope: re-collect statistics after each group of layers is solved (true-sequential), instead of
        once for all the block's groups."""
        return True

    def objective(self) -> str | None:
        """The quantity this stage's solve minimises per layer, for records and listings (None: it minimises
        nothing, e.g. magnitude pruning)."""
        return None

    def check_in_recipe(self, index: int, stages: list["StageBase"]) -> list["Problem"]:
        """What is wrong with this stage at position ``index`` among the recipe's ``stages`` (e.g. nothing after it
        uses what it prepares), found before any work starts: problems with a ``fix`` are errors, others warnings."""
        return []

    def before_blocks(self, job: "ModelJob", number: int) -> None:
        """Model-wide work before the block loop (``number``: this stage's index in the recipe). Runs again, the
        same way, when an interrupted run resumes, so it must be deterministic."""

    def transform_block(self, index: int, block: "nn.Module") -> None:
        """Change block ``index`` whenever the engine materialises it (in memory or streamed from disk), before
        any statistic is taken from it: how a model-wide transform (e.g. a rotation of the residual stream)
        reaches blocks that live on disk."""

    def restore_block(self, index: int, block: "nn.Module", groups: list[list[str]],
                      tensors: dict[str, "torch.Tensor"]) -> None:
        """On resume, re-apply to a finished block the structural changes this stage's work made to it (e.g.
        quantizers attached to its layers), before the engine copies back the tensors it reported changed
        (``tensors``: relative names -> saved values; ``groups``: the linear groups it selects in this block)."""

    def check_layers(self, layers: list[tuple[str, int]]) -> list["Problem"]:
        """What is wrong with running this stage on the layers it selects (``(full name, input width)``), found
        before any work starts: problems with a ``fix`` are errors, the others warnings."""
        return []

    def scheme(self) -> dict[str, Any] | None:
        """What this stage makes of the layers it selects, for the run record's ``scheme`` (weights, activations,
        key/value cache, rotations): None when it states nothing there."""
        return None

    # -- layer scope ---------------------------------------------------------------------------------------------
    def solve(self, job: "LayerJob") -> Any:
        """Layer scope: the layer's result (``core.results``: a QuantResult, a PruneResult, ...)."""
        raise NotImplementedError(f"stage {self.method!r} has scope {self.scope.value} but no layer solve")

    def record(self, result: Any) -> dict[str, Any]:
        """The fields of ``result`` that go into the layer's line of the run record (besides the engine's own)."""
        return {}

    def complete_output_error(self, info: dict[str, Any], output_norm: float) -> None:
        """Layer scope, with ``fp_target_projected``: complete ``info`` (a record line, or a result's info) that
        holds ``PENDING_OUTPUT_NORM`` from a solve made before the layer's ``||W X||^2`` was known."""
        raise NotImplementedError(f"stage {self.method!r} leaves no output error to complete")

    # -- block scope ---------------------------------------------------------------------------------------------
    def solve_block(self, job: "BlockJob") -> "BlockOutcome":
        raise NotImplementedError(f"stage {self.method!r} has scope {self.scope.value} but no block solve")


# a layer record's key while its asymmetric error waits for the layer's ||W X||^2 (``fp_target_projected``)
PENDING_OUTPUT_NORM = "fp_target_error_terms"


class LayerStats(Protocol):
    """What the engine collected for one linear group (its members share their input)."""

    hessian: "torch.Tensor | None"  # Stat.HESSIAN
    tokens: int | None
    # Stat.FP_TARGET: an object with ``identical``, ``correction``, ``weighted_cross``, ``output_norm`` (per layer), and
    # ``cross``, ``reference`` (Hessian-like) unless the engine gave it per layer (``fp_target_projected``)
    fp_target: Any
    channels: Any  # Stat.CHANNELS: an object with ``sum``, ``sq_sum``, ``abs_sum``, ``min``, ``max``, ``tokens``


class LayerJob(Protocol):
    """One linear layer handed to a layer stage's ``solve``."""

    name: str  # full module name
    module: "nn.Module"  # the layer in the block being compressed (current weights)
    uncompressed: "nn.Module | None"  # the same layer in the block before any stage changed it (Stat.FP_TARGET)
    stats: LayerStats
    # hand-over from earlier stages in this block: what they left (e.g. "pruned"), and under LAST_RESULT the result
    # of the last stage that solved this layer
    state: dict[str, Any]


class BlockJob(Protocol):
    """One decoder block handed to a block stage's ``solve_block``."""

    index: int
    prefix: str  # the block's full module name, e.g. "model.layers.3"
    block: "nn.Module"
    groups: list[list[str]]  # linear groups (relative names) this stage selects, in execution order
    adapter: Any  # the family's ModelAdapter
    inputs: list["torch.Tensor"]  # the block's calibration inputs, batches of windows (this rank's; do not modify)
    state: dict[str, dict[str, Any]]  # hand-over per layer (relative name)
    device: Any
    ranks: int  # data-parallel ranks of the run (1 in a single process)
    # the block's copy from before any stage changed it, which fp_target stages aim at (None without one): a block
    # stage whose change keeps the block's function (a folded scale) applies it there too, so they aim at the
    # layers as it left them
    uncompressed: "nn.Module | None"

    def forward(self, batch: int, hidden: "torch.Tensor | None" = None) -> "torch.Tensor": ...

    def collect(self, needs: frozenset[Stat], modules: dict[str, "nn.Module"]) -> dict[str, LayerStats]: ...

    def all_reduce(self, tensor: "torch.Tensor", op: str = "sum") -> None: ...


class BlockOutcome(BaseModel):
    """What a block stage did: results for the layers it compressed (relative names), and the names of other
    block tensors it changed in place (e.g. a norm weight that absorbed a scale), which the engine checkpoints and
    writes. ``records``: record lines by layer, also for layers changed without a result. ``record``: JSON-friendly
    facts about the block as a whole (e.g. the scales chosen per group of layers), kept in the run record's
    ``block_stages`` list.

    A block stage may also change the block's structure (parameters of new shapes, e.g. heads or channels removed,
    and the modules' integer attributes that go with them); the engine finds those changes itself (it compares
    the block's shapes and attributes before and after), checkpoints the reshaped parameters whole and re-applies
    the structure on resume, so they need not be listed here."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    results: dict[str, Any] = Field(default_factory=dict)
    records: dict[str, dict[str, Any]] = Field(default_factory=dict)
    changed: list[str] = Field(default_factory=list)
    record: dict[str, Any] = Field(default_factory=dict)


class ModelJob(Protocol):
    """The whole model, for ``before_blocks``."""

    model: "nn.Module"
    adapter: Any
    blocks: Any
    prefix: str
    calibration: "torch.Tensor | None"  # the calibration windows' token ids

    def statistics_pass(self, needs: frozenset[Stat], select: Callable[[str], bool],
                        observe: Callable[..., Any], streams: bool = False) -> list[Any]: ...

    def drop_blocks(self, blocks: list[int]) -> None: ...

    def set_block_options(self, number: int, block: int, options: dict[str, Any]) -> None: ...

    def log(self, message: str) -> None: ...


class Problem(BaseModel):
    """A problem a stage finds with its options in a recipe: an error when it has a ``fix``, else a warning."""

    message: str
    fix: str | None = None


class PhaseStage(StageBase):
    """A stage that works on the whole model between engine passes (e.g. recovery by distillation): the pipeline
    splits a recipe at these stages, runs the stages before each one through the engine, and calls its hooks; the
    engine never sees it. ``needs_teacher``: the pipeline keeps a frozen copy of the uncompressed model for it."""

    scope: ClassVar[Scope] = Scope.MODEL
    needs_teacher: ClassVar[bool] = False

    def check_position(self, index: int, last: bool) -> list["Problem"]:
        """What is wrong with this stage at position ``index`` of its recipe (``last``: it is the last stage), found
        before any work starts: problems with a ``fix`` are errors, the others warnings."""
        return []

    def before_phases(self, session: "PhaseSession", number: int) -> None:
        """Once for every phase stage (``number`` counts them from 1) before the first phase runs."""

    def run_phase(self, session: "PhaseSession", number: int) -> dict[str, Any]:
        """Change the model (and ``session.results``) in place; return this phase's record."""
        raise NotImplementedError(f"stage {self.method!r} is a phase stage without run_phase")


class PhaseSession(Protocol):
    """What phase stages share across the phases of one run (the pipeline's)."""

    model: "nn.Module"
    tokenizer: Any
    teacher: "nn.Module | None"
    stages: list[PhaseStage]  # every phase stage of the recipe, in order
    results: dict[str, Any]  # full layer name -> result (updated in place)
    layers: list[dict]  # the engine's per-layer records so far
    calibration: "torch.Tensor"  # the engine's calibration windows
    default_data: str
    data_dir: Any
    device: Any
    progress: bool
    max_context: int | None
    work_folder: Any  # a folder for resumable state (None: nothing is saved)
    key: str  # the run's fingerprint, to tag saved state
    resume: bool
    state: dict[str, Any]  # hand-over between phase stages
    adapter_files: dict[str, bytes]  # files to write beside the output (e.g. PEFT adapters)

    def requantize_on_grid(self, model: "nn.Module", targets: dict[str, tuple]) -> dict[str, tuple]:
        """GPTQ codes on each target layer's stored grid (``methods.recover.requant``), with the Hessians the
        engine collects on the calibration windows, block by block and true-sequentially."""
        ...

    def temporary_folder(self, prefix: str) -> Any:
        """A folder removed when the phases end."""
        ...


# -- the registry ----------------------------------------------------------------------------------------------------

_STAGES: dict[str, type[StageBase]] = {}


class StageRegistryError(ValueError):
    pass


def register_stage(cls: type[StageBase]) -> type[StageBase]:
    """Class decorator: make ``cls`` the stage type of its ``method`` (the default of its ``method`` field)."""
    method = cls.model_fields["method"].default
    if not isinstance(method, str) or not method:
        raise StageRegistryError(f"{cls.__name__} must give `method` a default name (e.g. Literal['x'] = 'x')")
    existing = _STAGES.get(method)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise StageRegistryError(f"method {method!r} is already registered by {existing.__name__}")
    _STAGES[method] = cls
    return cls


def unregister_stage(method: str) -> None:
    """Remove a registered stage type (tests that register toy methods clean up with this)."""
    _STAGES.pop(method, None)


def stage_types() -> dict[str, type[StageBase]]:
    """Every registered stage type by method name (a copy)."""
    return dict(_STAGES)
