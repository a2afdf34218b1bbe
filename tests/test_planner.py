"""The budget planner: the exact allocator, option sizes, sensitivity studies, plans that meet their budget in
stored bytes, and the errors of impossible budgets."""

import itertools
import json
import random
import sqlite3

import pytest
from helpers import save_tiny_llama, write_calibration_text

from lmshrink.cli import main
from lmshrink.core.errors import LmshrinkError
from lmshrink.core.store import Store
from lmshrink.formats.compressed_tensors import load_quantized_results
from lmshrink.methods.plan.allocate import InfeasibleBudget, allocate
from lmshrink.methods.plan.options import (
    DenseOption,
    PruneOption,
    QuantOption,
    Template,
    parse_option,
    parse_options,
    saveable_families,
)
from lmshrink.pipeline.checks import check_recipe
from lmshrink.pipeline.plan import Budget, plan, write_plan
from lmshrink.pipeline.recipe import RecipeError, parse_recipe
from lmshrink.pipeline.sensitivity import run_sensitivity
from lmshrink.pipeline.sweep import stored_bytes

OPTIONS = "w3g32-sym,w4g32-sym,w8-sym,w3g64,w4g64,dense"


def _brute_force(costs, weights, budget):
    best = None
    for combo in itertools.product(*[range(len(c)) for c in costs]):
        if any(costs[i][j] is None for i, j in enumerate(combo)):
            continue
        weight = sum(weights[i][j] for i, j in enumerate(combo))
        cost = sum(costs[i][j] for i, j in enumerate(combo))
        if weight <= budget and (best is None or cost < best - 1e-12):
            best = cost
    return best


@pytest.mark.parametrize("integer_weights", [True, False])
def test_allocator_is_optimal_on_small_cases_checked_by_brute_force(integer_weights):
    rng = random.Random(1 if integer_weights else 2)
    checked = infeasible = 0
    for _ in range(400):
        layers, options = rng.randint(1, 6), rng.randint(1, 4)
        costs = [[None if rng.random() < 0.15 else rng.random() * 10 for _ in range(options)] for _ in range(layers)]
        for row in costs:
            if all(c is None for c in row):
                row[rng.randrange(options)] = rng.random()
        weights = [[rng.randint(1, 20) if integer_weights else rng.uniform(0.5, 20) for _ in range(options)]
                   for _ in range(layers)]
        budget = rng.randint(3, 70)
        best = _brute_force(costs, weights, budget)
        if best is None:
            with pytest.raises(InfeasibleBudget) as caught:
                allocate(costs, weights, budget)
            lightest = sum(min(w for w, c in zip(ws, cs) if c is not None) for ws, cs in zip(weights, costs))
            assert caught.value.minimum == pytest.approx(lightest)
            infeasible += 1
            continue
        found = allocate(costs, weights, budget)
        assert found.cost == pytest.approx(best, rel=1e-12, abs=1e-12)
        assert found.weight <= budget
        assert sum(weights[i][j] for i, j in enumerate(found.choice)) == pytest.approx(found.weight)
        assert sum(costs[i][j] for i, j in enumerate(found.choice)) == pytest.approx(found.cost)
        assert found.lower_bound <= found.cost + 1e-9
        checked += 1
    assert checked > 250 and infeasible > 5


def test_allocator_handles_a_model_sized_problem_quickly():
    rng = random.Random(0)
    bits = [3.17, 3.5, 4.17, 4.5, 8.1]
    costs, weights = [], []
    for _ in range(210):  # SmolLM2-135M: 30 blocks x 7 linears
        size = rng.choice([331776, 110592, 884736])
        base = rng.uniform(0.1, 5)
        costs.append([base * 2 ** (-2 * b) * rng.uniform(0.8, 1.2) for b in bits])
        weights.append([int(size * b / 8) for b in bits])
    low, high = sum(min(w) for w in weights), sum(max(w) for w in weights)
    found = allocate(costs, weights, low + 0.2 * (high - low))
    assert found.weight <= low + 0.2 * (high - low)
    assert found.cost >= found.lower_bound - 1e-12
    assert found.cost <= found.lower_bound * 1.01  # many layers: the LP bound is tight


def test_options_parse_and_write_back():
    for text in ("dense", "w4g64-sym", "w3g128", "w8-sym", "w2g32", "sp50", "2:4", "sp50+w4g64-sym", "2:4+w3g32"):
        assert parse_option(text).key == text
    assert parse_option("w4g64-sym") == QuantOption(4, 64, True)
    assert parse_option("2:4+w3g32") == PruneOption(0.5, "2:4", QuantOption(3, 32, False))
    for bad in ("w5g64", "w4g0", "sp0", "4:2", "sp50+x", "int4"):
        with pytest.raises(LmshrinkError, match="not one the planner knows"):
            parse_option(bad)
    assert [o.key for o in parse_options("w3g64,dense,w3g64")] == ["w3g64", "dense"]
    # a group size must divide the layer's width, so no layer's bytes depend on which layers share its grid
    assert not QuantOption(4, 128, True).applies(576, 576) and QuantOption(4, 64, True).applies(576, 576)
    assert QuantOption(4, 64, False).stored_bytes(8, 128, 4) == 8 * 16 * 4 + 8 * 2 * 4 + 1 * 2 * 4 + 16
    assert DenseOption().stored_bytes(8, 128, 2) == 8 * 128 * 2


def test_saveable_families_are_what_the_checkpoint_writer_accepts():
    options = parse_options("w3g32-sym,w4g32-sym,w8-sym,w3g64,w4g64,dense,sp50,sp50+w4g32-sym")
    families = saveable_families(options)
    assert [sorted(o.key for o in f) for f in families] == [
        sorted(["dense", "sp50", "w3g32-sym", "w4g32-sym", "w8-sym", "sp50+w4g32-sym"]),
        ["dense", "sp50", "w3g64"], ["dense", "sp50", "w4g64"]]
    layers = [(f"model.layers.0.mlp.l{i}", 128) for i in range(8)]

    def recipe_of(keys):
        stages = []
        for i, key in enumerate(keys):
            for stage in parse_option(key).stages(Template()):
                stages.append({**stage, "targets": [layers[i][0]]})
        return parse_recipe({"order": "group", "stages": stages})

    for family in families:  # every family mixed in one recipe passes the writer's checks
        check_recipe(recipe_of([o.key for o in family if o.key != "dense"]), layers, dtype="float32")
    with pytest.raises(RecipeError, match="asymmetric grids mixed"):
        check_recipe(recipe_of(["w3g64", "w4g64"]), layers, dtype="float32")
    with pytest.raises(RecipeError, match="asymmetric grids mixed"):
        check_recipe(recipe_of(["w3g64", "w4g32-sym"]), layers, dtype="float32")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny model, calibration text and a sensitivity study of it."""
    root = tmp_path_factory.mktemp("planner")
    text = write_calibration_text(root / "calib.txt")
    model = save_tiny_llama(root / "model", hidden_size=64, intermediate_size=128)
    store = root / "sens.sqlite"
    record = run_sensitivity(str(model), store, options=OPTIONS, calibration=f"file:{text}", nsamples=4, seqlen=32,
                             progress=False)
    return {"root": root, "text": text, "model": model, "store": store, "record": record}


def test_sensitivity_stores_every_layer_and_option_and_resumes(study, tmp_path):
    record = study["record"]
    assert record["layers"] == 14 and record["last_run"]["layers_measured"] == 14
    with Store(study["store"]) as db:
        rows = db.sensitivity(record["study"])
    assert len(rows) == 14 * 6
    by = {(r["layer"], r["option"]): r["proxy"] for r in rows}
    for layer in {r["layer"] for r in rows}:
        assert by[(layer, "dense")] == 0.0
        assert by[(layer, "w8-sym")] < by[(layer, "w4g32-sym")] < by[(layer, "w3g32-sym")]
    # a study killed after block 0: the rows of block 1 are missing; running again measures only those
    copy = tmp_path / "partial.sqlite"
    copy.write_bytes(study["store"].read_bytes())
    for suffix in ("-wal", "-shm"):
        source = study["store"].with_name(study["store"].name + suffix)
        if source.exists():
            (tmp_path / f"partial.sqlite{suffix}").write_bytes(source.read_bytes())
    with Store(copy) as db, db.transaction():
        db.db.execute("DELETE FROM sensitivity WHERE layer LIKE 'model.layers.1.%'")
    again = run_sensitivity(str(study["model"]), copy, options=OPTIONS, calibration=f"file:{study['text']}",
                            nsamples=4, seqlen=32, progress=False)
    assert again["study"] == record["study"] and again["last_run"]["layers_measured"] == 7
    with Store(copy) as db:
        assert {(r["layer"], r["option"]): r["proxy"] for r in db.sensitivity(record["study"])} == pytest.approx(by)


def _measured(folder):
    return stored_bytes(folder)["stored_bytes"]


def test_plans_meet_their_budget_exactly_in_stored_bytes(study, tmp_path):
    from lmshrink import compress

    record = study["record"]
    parameters = 2 * (3 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)  # q,o,(k,v) and gate,up,down of 2 blocks
    budgets = [Budget(bits=4.2), Budget(size_bytes=record["fixed_bytes"] + int(4.6 * parameters / 8))]
    for number, budget in enumerate(budgets):
        made = plan(study["store"], budget)
        limit = (budget.size_bytes if budget.size_bytes else record["fixed_bytes"] + budget.bits * parameters / 8)
        assert made["predicted_stored_bytes"] <= limit
        path, sidecar = write_plan(made, tmp_path / f"plan{number}.yaml")
        assert json.loads(sidecar.read_text())["predicted_stored_bytes"] == made["predicted_stored_bytes"]
        out = tmp_path / f"out{number}"
        compress(str(study["model"]), str(path), output=out, calibration=f"file:{study['text']}", nsamples=4,
                 seqlen=32, progress=False)
        assert _measured(out) == made["predicted_stored_bytes"]  # exact: the planner's sizes are the writer's
        chosen = {layer["layer"]: parse_option(layer["option"]) for layer in made["layers"]}
        stored = load_quantized_results(out)
        assert set(stored) == {name for name, option in chosen.items() if option.scheme() is not None}
        for name, result in stored.items():
            assert (result.spec.bits, result.spec.group_size, result.spec.symmetric) == chosen[name].scheme()


def test_impossible_budgets_name_the_smallest_achievable_size(study, tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    code = main(["plan", str(study["model"]), "--sensitivity", str(study["store"]), "--size-mb", "0.01",
                 "-o", str(out)])
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "smallest achievable size with these options is" in err and "--size-mb" in err
    smallest = int(err.split("options is ")[1].split(" bytes")[0])
    # exactly that size is possible (all layers on the smallest grid)
    made = plan(study["store"], Budget(size_bytes=smallest))
    assert made["predicted_stored_bytes"] == smallest
    with pytest.raises(LmshrinkError, match="smallest achievable size") as caught:
        plan(study["store"], Budget(size_bytes=smallest - 1))
    assert str(smallest) in caught.value.message
    assert main(["plan", str(study["model"]), "--sensitivity", str(study["store"]), "--bits", "4.5", "-o",
                 str(out)]) == 0
    assert out.exists() and "lmshrink plan" in out.read_text()


def test_store_survives_a_kill_in_the_middle_of_a_write(tmp_path):
    import subprocess
    import sys

    db = tmp_path / "runs.sqlite"
    script = f"""
import os, signal
from lmshrink.core.store import Store
from lmshrink.formats.compressed_tensors import load_quantized_results
store = Store({str(db)!r})
run = store.add_run("a", "m", "first", "preset", {{}}, 0, {{}})
store.finish_run(run, {{"ok": True}}, {{"kl": 0.5}})
second = store.add_run("b", "m", "second", "preset", {{}}, 0, {{}})
with store.transaction():
    store.db.executemany("INSERT INTO metrics (run_id, name, value) VALUES (?, ?, ?)",
                         [(second, f"m{{i}}", float(i)) for i in range(5000)])
    store.db.execute("UPDATE runs SET status = 'done' WHERE id = ?", (second,))
    os.kill(os.getpid(), signal.SIGKILL)  # killed before the transaction commits
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    with Store(db) as store:
        assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        runs = {r["name"]: r for r in store.runs()}
    assert runs["first"]["status"] == "done" and runs["first"]["metrics"] == {"kl": 0.5}
    assert runs["second"]["status"] == "pending" and runs["second"]["metrics"] == {}
    raw = sqlite3.connect(db)
    assert raw.execute("SELECT count(*) FROM metrics").fetchone()[0] == 1


def test_latency_budgets_use_the_timing_table(study):
    shapes = {"64x64", "32x64", "128x64", "64x128"}
    per_option = {"dense": 1e-5, "w8-sym": 3e-5, "w4g32-sym": 2e-5, "w3g32-sym": 2e-5, "w4g64": 2.5e-5,
                  "w3g64": 2.5e-5}
    table = {"seconds": {s: dict(per_option) for s in shapes}, "fixed_seconds": 1e-3, "dense_seconds": 1e-3 + 14e-5}
    made = plan(study["store"], Budget(latency_ms=1e3 * (1e-3 + 14 * 1.8e-5)), latency=table,
                options=["w3g32-sym", "w4g32-sym", "dense"])
    assert made["predicted_latency_s"] <= 1e-3 + 14 * 1.8e-5 + 1e-12
    options = [layer["option"] for layer in made["layers"]]
    assert options.count("dense") >= 3  # only dense layers buy the time back
    with pytest.raises(LmshrinkError, match="fastest choice takes 1.140 ms"):
        plan(study["store"], Budget(latency_ms=1.0), latency=table)


def test_prune_options_asked_for_by_name_need_allow(study):
    with pytest.raises(LmshrinkError, match="--allow prune"):
        plan(study["store"], Budget(bits=5.0), options=["sp50+w4g32-sym", "w4g32-sym"])
    with pytest.raises(LmshrinkError, match="was not measured"):
        plan(study["store"], Budget(bits=5.0), options=["sp50+w4g32-sym", "w4g32-sym"], allow=["prune"])
