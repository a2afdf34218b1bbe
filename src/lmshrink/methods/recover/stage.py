"""The ``recover`` stage: its options, and the phase hooks that run distillation into LoRA adapters between the
engine's passes (the training itself is in ``train``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from lmshrink.core.stage import PhaseStage, Problem, match, register_stage


@register_stage
class RecoverStage(PhaseStage):
    """Recovery after compression: distil the uncompressed model (teacher) into LoRA adapters on the compressed model
    (student), then merge them (keeping pruned zeros and quantization grids) or save them in PEFT format.

    Quantized layers train against their dequantized weights (QLoRA-style); on merge, ``requantize`` says how the
    merged weights are put back onto each layer's stored grid: ``round`` (to nearest) or ``gptq`` (the GPTQ sweep on
    the fixed grid with the merged model's calibration Hessians, see ``methods/recover/requant``).

    A phase stage: it runs on the whole model after the block-by-block stages before it (the pipeline's phases).

    Cost: one step of ``batch`` x ``seqlen`` tokens is a teacher forward, a student forward, its backward (about two
    forwards) and, with ``gradient_checkpointing``, a second student forward of each block: about 5 forward passes'
    worth (4 without checkpointing; one fewer with ``teacher_cache: topk``, whose teacher runs over the training
    windows once, before training). On a small CPU the default 200 steps take hours: ``max_seconds`` gives the stage
    a fixed wall-time budget instead (the learning rate then decays over that time; docs/recovery.md).
    """

    summary = "distil the uncompressed model into LoRA adapters, then merge them"
    needs_teacher = True
    method: Literal["recover"] = "recover"
    targets: list[str] = Field(default_factory=lambda: ["all-linear"],
                               description="'all-linear' (every decoder-block linear) or module-name patterns")
    teacher: Literal["base"] = Field("base", description="the uncompressed model the recipe started from")
    loss: Literal["kl", "mse", "kl+mse"] = Field(
        "kl", description="kl: KL(teacher || student) on next-token distributions; mse: mean over decoder blocks of "
        "the MSE between student and teacher block outputs divided by the teacher's variance; kl+mse: KL plus "
        "hidden_weight times that MSE")
    hidden_weight: float = Field(1.0, ge=0, description="weight of the per-block hidden-state MSE in 'kl+mse'")
    teacher_cache: Literal["none", "topk"] = Field(
        "none", description="none: the teacher's logits are computed on the fly at every step (its decoder blocks "
        "stay in memory); topk: before training the teacher runs once over every training window, its teacher_topk "
        "largest log-probabilities (at the stage temperature) and their token ids per position are written to disk "
        "(the output's work folder, else a temporary folder), its decoder blocks are freed, and the KL is taken over "
        "the k cached tokens plus one 'rest' bucket (a lower bound of the full KL, equal to it when k is the "
        "vocabulary size; the held-out KL stays exact); loss 'kl' only, and not for models whose logits are "
        "changed after the output head (logit soft-capping)")
    teacher_topk: int = Field(64, ge=1, le=65536, description="tokens per position kept by teacher_cache 'topk' "
                              "(capped at the vocabulary size; disk: about 6 bytes per token per position of each "
                              "of the min(steps x batch, 4096) training windows, all written before training, also "
                              "when max_seconds ends it sooner)")
    lm_weight: float = Field(0.0, ge=0, description="weight of the student's next-token cross-entropy added to KL")
    temperature: float = Field(1.0, gt=0, le=100, description="softmax temperature of both distributions in the "
                               "KL (the loss is scaled by temperature**2)")
    adapter: Literal["lora", "full"] = Field(
        "lora", description="lora: train LoRA adapters and merge them; full: train the selected layers' weights "
        "themselves (and their biases; pruned zeros kept; not for quantized layers): more to train and more "
        "optimizer memory (AdamW: two states per weight), often a faster recovery of a structurally pruned model")
    rank: int = Field(16, ge=1, le=4096, description="LoRA rank")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha: the update is B@A * alpha/rank")
    steps: int = Field(200, ge=1, description="optimizer steps (at most; early stopping may end sooner)")
    lr: float = Field(2e-4, gt=0, le=1, description="AdamW learning rate (cosine decay to 0 over the steps)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the adapters")
    batch: int = Field(4, ge=1, description="windows per optimizer step")
    seqlen: int = Field(512, ge=8, description="tokens per training and evaluation window")
    data: str | None = Field(None, description="text set for training and held-out windows (default: the "
                             "calibration text)")
    eval_windows: int = Field(8, ge=1, description="held-out windows (documents not used for training)")
    eval_every: int | None = Field(None, ge=1, description="steps between held-out evaluations (default steps/8)")
    patience: int = Field(2, ge=0, description="stop after this many evaluations without a better held-out KL "
                          "(0: never stop early); the best adapters are kept")
    merge: bool = Field(True, description="merge the adapters into the weights (pruned zeros and grids kept); "
                        "false: save them in PEFT format in <output>/adapter")
    requantize: Literal["round", "gptq"] = Field(
        "round", description="how merged quantized layers go back onto their stored grid (scales, zeros and group "
        "index unchanged, pruned zeros kept): round: each weight to nearest; gptq: codes chosen by a GPTQ sweep on "
        "the Hessians of the merged model's inputs on the calibration windows (one more pass over the calibration "
        "windows, block by block; usually a lower layer output error than round)")
    gradient_checkpointing: bool = Field(True, description="recompute each decoder block's activations in backward "
                                         "instead of keeping them (much less memory, about one more forward pass "
                                         "of time per step; results equal up to float rounding)")
    max_seconds: float | None = Field(None, gt=0, description="stop training once the stage has run this many "
                                      "seconds (wall time, data preparation and held-out evaluations included); the "
                                      "cosine learning-rate decay then follows elapsed time or steps, whichever is "
                                      "further along (not bit-reproducible)")
    save_every: int = Field(50, ge=0, description="save adapters, optimizer and step to the output's work folder "
                            "every this many steps, so --resume continues a killed run from there (0: never)")
    chunk_tokens: int = Field(256, ge=1, description="token positions per chunk of the vocabulary-wide KL (caps "
                              "the memory of the next-token distributions: about 3 x chunk_tokens x vocab floats)")
    seed: int = 0

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("teacher_cache")
    @classmethod
    def _teacher_cache(cls, value: str, info) -> str:
        loss = info.data.get("loss", "kl")
        if value == "topk" and loss != "kl":
            raise ValueError(f"loss {loss!r} compares the teacher's block outputs, which the top-k cache does not "
                             "keep: use loss 'kl' with teacher_cache 'topk', or teacher_cache 'none' with "
                             f"loss {loss!r}")
        return value

    def selects(self, name: str) -> bool:
        if "all-linear" in self.targets:
            return not any(match(p, name) for p in self.ignore)
        return super().selects(name)

    def eval_interval(self) -> int:
        return self.eval_every or max(1, self.steps // 8)

    def inapplicable_options(self) -> set[str]:
        return {"rank", "alpha", "requantize", "merge"} if self.adapter == "full" else set()

    def check_position(self, index: int, last: bool) -> list[Problem]:
        problems = []
        where = f"stage {index + 1} (recover)"
        if self.adapter == "full" and not self.merge:
            problems.append(Problem(message=f"{where}: option 'merge' = False keeps adapters apart, and adapter "
                                            "'full' trains the weights themselves (there are no adapters)",
                                    fix="use merge: true (the default) with adapter: full"))
        if not self.merge and not last:
            problems.append(Problem(
                message=f"{where}: option 'merge' = False is only possible in the last stage (later stages would "
                        "compress the model without the adapters)", fix="use merge: true here, or make this the last stage"))
        if self.requantize != "round" and not self.merge:
            problems.append(Problem(
                message=f"{where}: option 'requantize' = {self.requantize!r} applies to merged layers, and 'merge' is "
                        "False (the adapters are saved, nothing is re-quantized)", fix="use merge: true, or drop requantize"))
        if self.teacher_cache == "topk" and self.max_seconds:
            windows = min(self.steps * self.batch, 4096)
            problems.append(Problem(
                message=f"{where}: teacher_cache 'topk' runs the teacher over all {windows} training windows (steps x "
                        f"batch, at most 4096) before training, and that time counts in max_seconds = "
                        f"{self.max_seconds:g}: set steps to what the budget allows"))
        return problems

    def before_phases(self, session, number: int) -> None:
        """With ``teacher_cache: topk``, the teacher's cache is written before any phase runs, so the teacher's blocks
        can be freed as soon as every remaining recover stage has its cache."""
        if self.teacher_cache != "topk":
            return
        from lmshrink.methods.recover.text import stage_windows, teacher_cache_key
        from lmshrink.methods.recover.train import prepare_teacher_cache

        if session.work_folder is not None:
            folder = session.work_folder / f"recover-{number}-teacher-topk"
        else:
            folder = session.temporary_folder("lmshrink-teacher-") / "topk"
        windows = stage_windows(self, session.tokenizer, session.default_data, session.data_dir, session.max_context)
        session.state.setdefault("teacher_caches", {})[number] = prepare_teacher_cache(
            session.teacher, self, windows, folder, teacher_cache_key(self, windows, _state_key(session, number)),
            reuse=session.resume, device=session.device, progress=session.progress)

    def run_phase(self, session, number: int) -> dict[str, Any]:
        from lmshrink.methods.recover.teacher_cache import block_bytes, release_blocks
        from lmshrink.methods.recover.train import Forward, recover

        caches = session.state.get("teacher_caches", {})
        blocks = Forward(session.teacher).blocks
        session.state.setdefault("teacher_bytes", block_bytes(blocks))
        if (caches and not session.state.get("teacher_freed")
                and all(getattr(s, "teacher_cache", None) == "topk" for s in session.stages[number - 1:])):
            release_blocks(blocks, keep=session.model)
            session.state["teacher_freed"] = True
        state_dir = session.work_folder / f"recover-{number}" if session.work_folder is not None else None
        record = recover(session.model, session.teacher, session.tokenizer, self, session.results,
                         default_data=session.default_data, data_dir=session.data_dir, device=session.device,
                         progress=session.progress, max_context=session.max_context,
                         adapter_out=session.adapter_files, state_dir=state_dir,
                         state_key=_state_key(session, number), resume=session.resume,
                         teacher_cache=caches.get(number), requantize_on_grid=session.requantize_on_grid,
                         teacher_blocks=session.state.get("block_sources"))
        if number in caches:
            record["teacher_cache"].update(teacher_block_bytes=session.state["teacher_bytes"],
                                           teacher_blocks_freed=bool(session.state.get("teacher_freed")))
        if "merge" in record:
            _note_weight_change(session.layers, record["merge"]["rel_weight_change"], number)
        return record


def _state_key(session, number: int) -> str:
    return f"{session.key}-recover-{number}" if session.work_folder is not None else ""


def _note_weight_change(layers: list[dict], change: dict[str, float], phase: int) -> None:
    """Add the merge's relative weight change to the last engine record of each merged layer (the engine's
    ``rel_output_error`` was measured before recovery changed the weights)."""
    seen: set[str] = set()
    for layer in reversed(layers):
        name = layer["name"]
        if name in change and name not in seen:
            seen.add(name)
            layer.setdefault("recover_rel_weight_change", {})[f"recover {phase}"] = change[name]
