"""Plans: one option per linear layer, chosen from a sensitivity study to minimise the summed proxy cost within a
budget (stored bytes, bits per weight, or decode latency), written as an ordinary recipe (one stage per option,
``targets`` naming its layers) that ``lmshrink compress --recipe plan.yaml`` runs, with a record of what the plan
predicts (``plan.json`` beside the YAML)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmshrink.core.atomic import atomic_write_text
from lmshrink.core.errors import LmshrinkError
from lmshrink.core.store import Store
from lmshrink.methods.plan.allocate import InfeasibleBudget, allocate
from lmshrink.methods.plan.options import Option, Template, parse_option, saveable_families
from lmshrink.pipeline.checks import check_recipe
from lmshrink.pipeline.recipe import parse_recipe

PLAN_KEY = "lmshrink_plan"


@dataclass
class Budget:
    """One budget: ``bits`` (stored bits per weight of the planned layers, scales and zero points included),
    ``size_mb`` (the checkpoint's stored tensor bytes, 10**6 per MB), ``size_bytes``, or ``latency_ms`` (the
    summed per-layer kernel time of one decoded token, from a timing table)."""

    bits: float | None = None
    size_mb: float | None = None
    size_bytes: int | None = None
    latency_ms: float | None = None

    def describe(self) -> str:
        if self.bits is not None:
            return f"{self.bits:g} bits per weight"
        if self.size_mb is not None:
            return f"{self.size_mb:g} MB"
        if self.size_bytes is not None:
            return f"{self.size_bytes} bytes"
        return f"{self.latency_ms:g} ms of linear-layer time per token"


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def load_study(store: str | Path, study: str | None = None) -> tuple[dict, list[dict]]:
    """The study's record and rows (the only or the latest study in the store when ``study`` is None)."""
    if not Path(store).exists():
        raise LmshrinkError(f"sensitivity store {store} does not exist",
                            fix="run `lmshrink sensitivity MODEL -o STORE` first, or let `lmshrink plan` run it")
    with Store(store) as db:
        studies = db.studies()
        if not studies:
            raise LmshrinkError(f"{store} holds no sensitivity study", fix="run `lmshrink sensitivity MODEL -o STORE`")
        chosen = studies[-1] if study is None else next((s for s in studies if s["study"] == study), None)
        if chosen is None:
            raise LmshrinkError(f"{store} has no study {study!r}",
                                fix=f"use one of: {', '.join(s['study'] for s in studies)}")
        return chosen["record"], db.sensitivity(chosen["study"])


def plan(store: str | Path, budget: Budget, *, study: str | None = None, options: list[str] | None = None,
         allow: list[str] | tuple[str, ...] = (), latency: dict | None = None, name: str | None = None
         ) -> dict[str, Any]:
    """Choose one option per layer of the study within ``budget``; returns the plan record (``recipe``: the recipe
    as a mapping; ``layers``: each layer's option, stored bytes and proxy cost; the predicted stored bytes).

    options: the option keys to choose from (default: every option the study measured); prune options only with
    ``"prune"`` in ``allow``. latency: a timing table (``lmshrink bench --layer-table``), needed for a latency
    budget. Raises LmshrinkError naming the smallest size (or latency) any choice reaches when nothing fits."""
    record, rows = load_study(store, study)
    template = Template(**record["template"])
    element_size = int(record["element_size"])
    wanted = options or record["options"]
    chosen_options: list[Option] = []
    for key in wanted:
        option = parse_option(key)
        if option.family != "quant" and option.family not in allow:
            if options:  # asked for by name
                raise LmshrinkError(f"option {option.key} is a {option.family} option, which the plan may use only "
                                    f"when allowed", fix=f"add --allow {option.family} (Python: allow=['{option.family}'])")
            continue
        if option.key not in record["options"]:
            raise LmshrinkError(f"option {option.key} was not measured in study {record['study']}",
                                fix=f"measure it (lmshrink sensitivity ... --options {option.key}) or choose from "
                                    f"{', '.join(record['options'])}")
        chosen_options.append(option)
    if not chosen_options:
        raise LmshrinkError("no option left to choose from", fix="check --options and --allow")
    costs: dict[tuple[str, str], float] = {(r["layer"], r["option"]): r["proxy"] for r in rows
                                           if r["proxy"] is not None}
    shapes = {r["layer"]: (r["out_features"], r["in_features"]) for r in rows}
    layers = sorted(shapes, key=_natural)
    parameters = sum(o * i for o, i in shapes.values())
    fixed = int(record["fixed_bytes"])

    def weight_of(option: Option, layer: str) -> float | None:
        out_features, in_features = shapes[layer]
        if budget.latency_ms is not None:
            return _latency(latency, option, out_features, in_features)
        return option.stored_bytes(out_features, in_features, element_size)

    if budget.bits is not None:
        limit = budget.bits * parameters / 8
    elif budget.size_mb is not None or budget.size_bytes is not None:
        limit = (budget.size_bytes if budget.size_bytes is not None else budget.size_mb * 1e6) - fixed
    else:
        if latency is None:
            raise LmshrinkError("a latency budget needs a timing table",
                                fix="measure one: lmshrink bench MODEL --layer-table -o table.json, then "
                                    "--latency-table table.json")
        limit = budget.latency_ms / 1e3 - float(latency.get("fixed_seconds", 0.0))
    best, smallest = None, None
    for family in saveable_families(chosen_options):
        cost_table, weight_table = [], []
        for layer in layers:
            cost_table.append([costs.get((layer, o.key)) if o.applies(*shapes[layer]) else None for o in family])
            weight_table.append([weight_of(o, layer) if o.applies(*shapes[layer]) else None for o in family])
        if any(all(c is None or w is None for c, w in zip(cs, ws)) for cs, ws in zip(cost_table, weight_table)):
            continue  # a layer no option of this family fits
        try:
            allocation = allocate(cost_table, weight_table, limit)
        except InfeasibleBudget as exc:
            smallest = exc.minimum if smallest is None else min(smallest, exc.minimum)
            continue
        if best is None or allocation.cost < best[1].cost:
            best = (family, allocation)
    if best is None:
        raise _infeasible(budget, smallest, fixed, parameters, latency)
    family, allocation = best
    choice = {layer: family[j] for layer, j in zip(layers, allocation.choice)}
    by_option: dict[str, list[str]] = {}
    for layer in layers:
        by_option.setdefault(choice[layer].key, []).append(layer)
    stages = []
    for key in sorted(by_option, key=lambda k: (-len(by_option[k]), k)):
        option = next(o for o in family if o.key == key)
        for stage in option.stages(template):
            stages.append({**stage, "targets": by_option[key]})
    planned_bytes = sum(choice[layer].stored_bytes(*shapes[layer], element_size) for layer in layers)
    label = name or f"plan-{budget.describe().replace(' ', '')}"
    summary = (f"plan for {budget.describe()}: {', '.join(f'{len(v)} {k}' for k, v in by_option.items())}; predicted "
               f"{fixed + planned_bytes} stored bytes ({8 * planned_bytes / parameters:.3f} bits per planned weight)")
    recipe = {"name": label, "summary": summary, "order": "group", "stages": stages} if stages else None
    if recipe is not None:
        parsed = parse_recipe(recipe, name=label)
        check_recipe(parsed, [(layer, shapes[layer][1]) for layer in layers], dtype=record.get("dtype", "float32"))
    return {
        PLAN_KEY: 1, "name": label, "budget": budget.__dict__, "study": record["study"], "model": record["model"],
        "calibration": record["calibration"], "template": template.to_dict(),
        "options": [o.key for o in chosen_options], "family": [o.key for o in family],
        "proxy_cost": allocation.cost, "lp_lower_bound": allocation.lower_bound,
        "predicted_stored_bytes": fixed + planned_bytes, "predicted_planned_bytes": planned_bytes,
        "fixed_bytes": fixed, "planned_parameters": parameters,
        "predicted_bits_per_weight": 8 * planned_bytes / parameters,
        "predicted_latency_s": (sum(_latency(latency, choice[l], *shapes[l]) for l in layers)
                                + float(latency.get("fixed_seconds", 0.0))) if latency else None,
        "layers": [{"layer": layer, "option": choice[layer].key, "proxy": costs.get((layer, choice[layer].key)),
                    "stored_bytes": choice[layer].stored_bytes(*shapes[layer], element_size)} for layer in layers],
        "recipe": recipe,
    }


def _latency(table: dict | None, option: Option, out_features: int, in_features: int) -> float | None:
    if table is None:
        return None
    return table.get("seconds", {}).get(f"{out_features}x{in_features}", {}).get(option.key)


def _infeasible(budget: Budget, smallest, fixed: int, parameters: int, latency) -> LmshrinkError:
    if smallest is None:
        return LmshrinkError(f"no option set can be saved for every layer within {budget.describe()}",
                             fix="allow more options (--options), e.g. a per-channel grid (w8-sym) or dense")
    if budget.latency_ms is not None:
        fastest = (smallest + float(latency.get("fixed_seconds", 0.0))) * 1e3
        return LmshrinkError(f"no plan reaches {budget.describe()}: the fastest choice takes {fastest:.3f} ms",
                             fix=f"ask for {fastest:.3f} ms or more, or allow faster options")
    total = fixed + int(smallest)
    return LmshrinkError(
        f"no plan fits {budget.describe()}: the smallest achievable size with these options is {total} bytes "
        f"({total / 1e6:.2f} MB, {8 * smallest / parameters:.3f} bits per planned weight; {fixed / 1e6:.2f} MB of "
        "it is what no plan changes: embeddings, norms, layers not planned)",
        fix=f"ask for --size-mb {total / 1e6:.2f} (--bits {8 * smallest / parameters:.3f}) or more, or allow "
            "smaller options (--options with fewer bits or larger groups)")


def write_plan(record: dict, output: str | Path) -> tuple[Path, Path]:
    """The plan as recipe YAML at ``output`` (a comment header says what it predicts) and its record beside it
    (``<stem>.json``); both written atomically."""
    output = Path(output)
    if record["recipe"] is None:
        raise LmshrinkError("the plan leaves every layer dense: there is no recipe to write",
                            fix="lower the budget, or drop the dense option")
    header = (f"# lmshrink plan: {record['recipe']['summary']}\n"
              f"# study {record['study']}; proxy cost {record['proxy_cost']:.6g} (LP bound "
              f"{record['lp_lower_bound']:.6g}); record: {output.with_suffix('.json').name}\n"
              f"# run it: lmshrink compress MODEL --recipe {output.name} -o OUT\n")
    atomic_write_text(output, header + yaml.safe_dump(record["recipe"], sort_keys=False))
    sidecar = output.with_suffix(".json")
    atomic_write_text(sidecar, json.dumps(record, indent=1))
    return output, sidecar


def plan_record_for(recipe_path: str | Path) -> dict | None:
    """The plan record beside a recipe file written by ``write_plan``, or None."""
    sidecar = Path(recipe_path).with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get(PLAN_KEY) else None
