"""The sensitivity study: for every linear layer and every candidate option, the cost the option adds (the proxy,
``methods.plan.proxy``) from one block-by-block pass of the dense model that changes nothing, and on request the
measured KL of the whole model with only that layer changed. Results go to a results store (``core.store``), layer
by layer, so a killed study resumes where it stopped and a finished one is reused by ``plan``."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import PrivateAttr

from lmshrink.core.digest import fingerprint
from lmshrink.core.errors import LmshrinkError
from lmshrink.core.process import cpu_seconds, environment
from lmshrink.core.stage import Scope, StageBase, match
from lmshrink.core.store import Store
from lmshrink.data.sources import load_text
from lmshrink.data.windows import calibration_windows, evaluation_windows
from lmshrink.engine.loop import Engine
from lmshrink.eval.perplexity import window_logits
from lmshrink.formats.loading import as_loaded
from lmshrink.methods.plan.options import Option, Template, parse_options
from lmshrink.methods.plan.proxy import needs_of, option_cost, proxy_stages
from lmshrink.models.adapters import get_adapter, iter_linears, linear_dims, linear_weight, set_linear_weight
from lmshrink.pipeline.recipe import parse_recipe

DEFAULT_CALIBRATION = "enwiki-sample"


class _StudyPass(StageBase):
    """A model-scope stage that changes nothing: its ``before_blocks`` runs the engine's statistics pass and hands
    each block's statistics to the study."""

    scope = Scope.MODEL
    method: str = "sensitivity"
    _needs: frozenset = PrivateAttr(default=frozenset())
    _observe: Any = PrivateAttr(default=None)

    def before_blocks(self, job, number: int) -> None:
        job.statistics_pass(self._needs, self.selects, self._observe)


def option_stages(options: list[Option], template: Template) -> dict[str, list[StageBase]]:
    """Each option's recipe stages as the proxy runs them (validated like any recipe)."""
    stages = {}
    for option in options:
        raw = option.stages(template)
        stages[option.key] = proxy_stages(parse_recipe(raw).stages) if raw else []
    return stages


def study_key(loaded, protocol: dict, template: Template) -> str:
    return fingerprint(loaded.info.to_dict(), protocol, template.to_dict())[:16]


def run_sensitivity(model, store: str | Path, *, options: str | list[str], template: Template | None = None,
                    calibration: str | None = None, calibration_split: str = "train", nsamples: int = 128,
                    seqlen: int = 512, seed: int = 0, data_dir=None, kl_layers: list[str] | None = None,
                    kl_options: list[str] | None = None, kl_data: str = "wikitext2", kl_split: str = "test",
                    kl_windows: int = 8,
                    targets: list[str] | None = None, ignore: list[str] | None = None,
                    progress: bool = True, dtype: str = "float32") -> dict[str, Any]:
    """Measure every option on every selected linear layer of ``model`` and store the rows in ``store``.

    Rows already in the store for this study (same model, calibration and template) are not measured again.
    kl_layers: module-name patterns (``re:`` regexes allowed) of the layers whose measured KL is also wanted: the
    whole model with only that layer changed, against the dense model, on ``kl_windows`` windows of ``kl_data``, for
    the options ``kl_options`` (default: all).
    Returns the study's record (what was measured, how long it took)."""
    template = template or Template()
    option_list = parse_options(options)
    loaded = as_loaded(model, dtype=dtype, device="cpu", progress=progress)
    adapter = get_adapter(loaded.model)
    selector = StageBase(method="select", **({"targets": targets} if targets else {}),
                         **({"ignore": ignore} if ignore is not None else {}))
    layers = {name: linear_dims(module) for name, module in iter_linears(loaded.model) if selector.selects(name)}
    if not layers:
        raise LmshrinkError(f"no linear layer of the model matches targets {selector.targets} (ignore "
                            f"{selector.ignore})", fix="check the patterns against the model's layer names")
    stages = option_stages(option_list, template)
    calib_name = calibration or DEFAULT_CALIBRATION
    source = load_text(calib_name, calibration_split, data_dir)
    windows = calibration_windows(loaded.tokenizer, source, nsamples, seqlen, seed, loaded.info.max_context)
    key = study_key(loaded, windows.protocol, template)
    measure_kl = {n for n in layers if kl_layers and any(match(p, n) for p in kl_layers)}
    kl_keys = {o.key for o in (parse_options(kl_options) if kl_options else option_list)}
    with Store(store) as db:
        done = {(r["layer"], r["option"]): r for r in db.sensitivity(key)}
        todo = {n: [o for o in option_list if o.applies(layers[n][0], layers[n][1])
                    and ((n, o.key) not in done or done[(n, o.key)]["proxy"] is None
                         or (n in measure_kl and o.key in kl_keys and done[(n, o.key)]["kl"] is None))]
                for n in layers}
        pending = {n: opts for n, opts in todo.items() if opts}
        started, cpu_started = time.perf_counter(), cpu_seconds()
        solve_seconds = 0.0
        kept: dict[tuple[str, str], torch.Tensor] = {}  # solved weights of the layers whose KL is measured
        if pending:
            needs = needs_of([s for ss in stages.values() for s in ss])

            def observe(index, block, stats):
                nonlocal solve_seconds
                prefix = f"{adapter.block_path(loaded.model)}.{index}."
                for relative, module in adapter.linears(block):
                    name = prefix + relative
                    if name not in pending:
                        continue
                    rows = []
                    for option in pending[name]:
                        out_features, in_features = layers[name]
                        if stages[option.key]:
                            cost, weight, seconds = option_cost(stages[option.key], name, module, stats[relative])
                        else:  # dense: nothing changes
                            cost, weight, seconds = 0.0, None, 0.0
                        solve_seconds += seconds
                        if name in measure_kl and option.key in kl_keys and weight is not None:
                            kept[(name, option.key)] = weight.to(linear_weight(module).dtype)
                        rows.append({"layer": name, "option": option.key, "out_features": out_features,
                                     "in_features": in_features, "proxy": cost, "proxy_seconds": seconds})
                    db.put_sensitivity(key, rows)  # one transaction per layer: a kill loses at most this layer
                if progress:
                    print(f"sensitivity: block {index + 1} done ({time.perf_counter() - started:.0f}s)",
                          file=sys.stderr)
                return None

            study = _StudyPass(targets=selector.targets, ignore=selector.ignore)
            study._needs, study._observe = needs, observe
            Engine(loaded.model, adapter, [study], windows.input_ids, progress=False).run()
        pass_seconds, pass_cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
        kl_seconds = 0.0
        if kept:
            kl_started = time.perf_counter()
            _measure_kl(loaded, kept, db, key, layers, kl_data, kl_split, kl_windows, seqlen, data_dir, progress)
            kl_seconds = time.perf_counter() - kl_started
        previous = db.study(key) or {}
        record = {
            "study": key, "model": loaded.info.to_dict(), "calibration": windows.protocol,
            "template": template.to_dict(), "options": sorted({*previous.get("options", []),
                                                               *(o.key for o in option_list)}),
            "layers": len(layers), "element_size": loaded.model.dtype.itemsize,
            "dtype": str(loaded.model.dtype).removeprefix("torch."),
            "fixed_bytes": _fixed_bytes(loaded.model, layers),
            "last_run": {"layers_measured": len(pending), "seconds": pass_seconds, "cpu_seconds": pass_cpu,
                         "solve_seconds": solve_seconds, "kl_seconds": kl_seconds,
                         "kl": {"data": kl_data, "split": kl_split, "windows": kl_windows, "seqlen": seqlen,
                                "layers": sorted(measure_kl)} if measure_kl else None},
            "environment": environment(),
        }
        runs = previous.get("runs", [])
        record["runs"] = runs + [record["last_run"]]
        db.add_study(key, loaded.info.source, record)
    return record


def _fixed_bytes(model: torch.nn.Module, layers: dict[str, tuple[int, int]]) -> int:
    """Bytes of every stored tensor but the weights of ``layers`` (tied tensors once): what no plan changes."""
    seen, total = set(), 0
    planned = {f"{name}.weight" for name in layers}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = (tensor.data_ptr(), tensor.numel())
        if name in planned or key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


@torch.inference_mode()
def _measure_kl(loaded, kept, db: Store, key: str, layers, kl_data, kl_split, kl_windows, seqlen, data_dir,
                progress) -> None:
    """KL(dense || model with one layer changed) per token on the evaluation windows, for each kept weight."""
    source = load_text(kl_data, kl_split, data_dir)
    windows = evaluation_windows(loaded.tokenizer, source, seqlen, limit=kl_windows)
    model = loaded.model.eval()
    base = [torch.log_softmax(window_logits(model, w[None])[0, :-1].float(), dim=-1) for w in windows.input_ids]
    for number, ((name, option), weight) in enumerate(sorted(kept.items())):
        module = model.get_submodule(name)
        original = linear_weight(module).detach().clone()
        set_linear_weight(module, weight)
        total = positions = 0.0
        for w, base_logp in zip(windows.input_ids, base):
            logp = torch.log_softmax(window_logits(model, w[None])[0, :-1].float(), dim=-1)
            total += float((base_logp.exp() * (base_logp - logp)).sum(-1).clamp_min(0.0).sum(dtype=torch.float64))
            positions += base_logp.shape[0]
        set_linear_weight(module, original)
        out_features, in_features = layers[name]
        db.put_sensitivity(key, [{"layer": name, "option": option, "out_features": out_features,
                                  "in_features": in_features, "kl": total / positions}])
        if progress:
            print(f"measured KL {number + 1}/{len(kept)}: {name} {option} {total / positions:.5f}", file=sys.stderr)
