"""Recovery (distillation into LoRA adapters) on tiny random models: merged sparse weights keep the mask and N:M
pattern exactly, the masked training forward equals the merged model, saved PEFT adapters reload with identical
logits, a recovery run lowers the held-out KL to the teacher, quantized merges stay on the stored grid, iterative
schedules end at the last sparsity, and bad options fail naming the option."""

import contextlib
import json

import pytest
import torch
from helpers import save_tiny_llama, tiny_llama, tiny_tokenizer, write_word_paragraphs
from transformers import AutoModelForCausalLM

from lmshrink import compress, load_model
from lmshrink.core.grids import dequantize
from lmshrink.core.results import PruneResult
from lmshrink.data.sources import load_text
from lmshrink.data.windows import evaluation_windows
from lmshrink.methods.recover.lora import adapter_files, attach, load_adapter, lora_delta, merge
from lmshrink.methods.recover.text import split_documents
from lmshrink.methods.recover.train import Forward, held_out_metrics
from lmshrink.models.adapters import iter_linears, linear_weight
from lmshrink.pipeline.checks import check_recipe
from lmshrink.pipeline.phases import split_phases
from lmshrink.pipeline.presets import PRESETS
from lmshrink.pipeline.recipe import RecipeError, load_recipe, parse_recipe

RECOVER = {"method": "recover", "steps": 12, "seqlen": 32, "batch": 4, "lr": 3e-3, "eval_windows": 4, "rank": 4,
           "alpha": 8, "eval_every": 4, "patience": 0}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-recover"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """30 paragraphs (documents) of random words: enough for training and held-out documents."""
    return write_word_paragraphs(tmp_path_factory.mktemp("text") / "text.txt", ("the quick brown fox jumps over lazy dog pruning sets some weights to zero model quality grid a "
             "language keeps most of their"))


def _compress(tiny_dir, text_file, stages, out=None, **kw):
    return compress(load_model(str(tiny_dir), progress=False), {"stages": stages}, output=out,
                    calibration=f"file:{text_file}", nsamples=4, seqlen=32, progress=False, overwrite=True, **kw)


def _nm_ok(weight, n, m):
    return bool(((weight == 0).reshape(weight.shape[0], -1, m).sum(-1) >= n).all())


def _ids(seed=1):
    return torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(seed))


def test_merged_sparse_weights_keep_mask_and_pattern(tiny_dir, text_file, tmp_path):
    prune = {"method": "sparsegpt", "pattern": "2:4"}
    plain = _compress(tiny_dir, text_file, [prune])
    record = _compress(tiny_dir, text_file, [prune, RECOVER], out=tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    changed = 0
    for name, module in iter_linears(reloaded):
        weight = linear_weight(module)
        before = plain["results"][name]
        after = record["results"][name]
        assert isinstance(after, PruneResult)
        assert torch.equal(after.mask, before.mask), name  # the merge kept the engine's mask
        assert torch.equal(weight == 0, before.mask), name  # exactly the pruned zeros, no others
        assert torch.equal(weight, after.dense()), name  # the writer saved the merged weights
        if prune.get("pattern") == "2:4":
            assert _nm_ok(weight, 2, 4), name
        changed += int(not torch.equal(weight, before.dense()))
    assert changed == 14  # every targeted layer got its update
    saved = json.loads((tmp_path / "out" / "lmshrink.json").read_text())
    assert saved["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-3)
    assert saved["recover"][0]["pruned_layers"] == 14
    changes = [layer["recover_rel_weight_change"]["recover 1"] for layer in saved["layers"]]
    assert len(changes) == 14 and all(c > 0 for c in changes)
    assert saved["recover"][0]["loss_path"] == "chunked output head"


def _masked_peft(seed=6, loss_masks=True):
    """A tiny Llama, magnitude-pruned at random, with LoRA adapters (random nonzero A and B) on every block linear."""
    model = tiny_llama(seed=seed)
    names = [n for n, _ in iter_linears(model)]
    results, masks = {}, {}
    for name, module in iter_linears(model):
        weight = linear_weight(module).clone()
        mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(len(name))) < 0.5
        results[name] = PruneResult.from_weight(weight, mask, pattern="unstructured", target_sparsity=0.5)
        masks[name] = mask
        module.weight.data.copy_(results[name].weight)
    peft_model = attach(model, names, rank=4, alpha=8, masks=masks if loss_masks else {})
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    return peft_model, names, masks, results


def test_masked_training_forward_equals_merged_model():
    peft_model, names, masks, results = _masked_peft(seed=3)
    with torch.no_grad():
        trained = peft_model(input_ids=_ids()).logits
        delta = lora_delta(peft_model.base_model.model.get_submodule(names[0]))
        assert bool((delta[masks[names[0]]] == 0).all()) and bool((delta != 0).any())
    merged_model, info = merge(peft_model, names, results, masks)
    assert info["layers"] == len(names) and info["mean_rel_delta_norm"] > 0
    with torch.no_grad():
        merged = merged_model(input_ids=_ids()).logits
    torch.testing.assert_close(merged, trained, rtol=1e-4, atol=1e-4)
    for name, module in iter_linears(merged_model):
        assert torch.equal(linear_weight(module) == 0, masks[name]), name
        assert torch.equal(results[name].dense(), linear_weight(module)), name


def test_adapters_saved_and_reloaded_give_identical_logits(tmp_path):
    model = tiny_llama(seed=4)
    names = [n for n, _ in iter_linears(model)]
    peft_model = attach(model, names, rank=4, alpha=8, masks={})
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
        expected = peft_model(input_ids=_ids()).logits
    folder = tmp_path / "adapter"
    folder.mkdir()
    for filename, content in adapter_files(peft_model, {}).items():
        (folder / filename).write_bytes(content)
    reloaded = load_adapter(tiny_llama(seed=4), folder)
    with torch.no_grad():
        got = reloaded(input_ids=_ids()).logits
    assert torch.equal(got, expected)
    with pytest.raises(Exception, match="merge"):
        adapter_files(peft_model, {names[0]: torch.zeros(1, dtype=torch.bool)})


def test_recovery_lowers_held_out_kl_and_unmerged_adapters_reload(tiny_dir, text_file, tmp_path):
    """Quantized student, merge: false: the PEFT adapters saved beside the checkpoint, applied to the reloaded
    checkpoint, reproduce the recorded held-out KL, which is lower than before recovery."""
    stage = {**RECOVER, "merge": False, "steps": 16}
    record = _compress(tiny_dir, text_file, [{"method": "rtn", "bits": 3, "group_size": 32}, stage],
                       out=tmp_path / "out")
    rec = record["recover"][0]
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    assert rec["held_out_after"]["kl"] < rec["held_out_before"]["kl"]
    assert rec["memory"]["lora"]["trainable_parameters"] < rec["memory"]["full_finetune"]["trainable_parameters"]
    assert rec["memory"]["lora"]["optimizer_state_measured"]
    # recompute independently: reloaded checkpoint + adapters against the original model on the held-out windows
    tokenizer = tiny_tokenizer()
    source = load_text(f"file:{text_file}", "train")
    parsed = load_recipe({"stages": [{"method": "rtn", "group_size": 32}, stage]}).stages[1]
    _, held = split_documents(source, tokenizer, parsed.eval_windows * parsed.seqlen * 2, parsed.seed)
    ids = evaluation_windows(tokenizer, held, parsed.seqlen).input_ids[: parsed.eval_windows]
    teacher = load_model(str(tiny_dir), progress=False).model
    student = load_adapter(load_model(str(tmp_path / "out"), progress=False).model, tmp_path / "out" / "adapter")
    after = held_out_metrics(student, teacher, ids, 4, "cpu")
    assert after["kl"] == pytest.approx(rec["held_out_after"]["kl"], rel=1e-4)
    plain = held_out_metrics(load_model(str(tmp_path / "out"), progress=False).model, teacher, ids, 4, "cpu")
    assert plain["kl"] == pytest.approx(rec["held_out_before"]["kl"], rel=1e-4)


def test_quantized_merge_stays_on_the_stored_grid():
    from lmshrink.core.grids import GridSpec
    from lmshrink.methods.quant.rtn import rtn_quantize

    model = tiny_llama(seed=5)
    names = [n for n, _ in iter_linears(model)]
    results = {}
    for name, module in iter_linears(model):
        results[name] = rtn_quantize(linear_weight(module).clone(), GridSpec(bits=4, group_size=32))
        module.weight.data.copy_(results[name].weight)
    before = dict(results)
    peft_model = attach(model, names, rank=4, alpha=8, masks={})
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    merged_model, info = merge(peft_model, names, results, {})
    changed = 0
    for name, module in iter_linears(merged_model):
        old, new = before[name], results[name]
        assert torch.equal(new.scale, old.scale) and torch.equal(new.zero, old.zero), name
        assert torch.equal(new.weight, dequantize(new.codes, new.scale, new.zero, new.group_index())), name
        assert torch.equal(linear_weight(module), new.weight), name
        changed += int((new.codes != old.codes).sum())
    assert changed > 0
    assert info["quantized_codes_changed"] == pytest.approx(changed / sum(r.codes.numel() for r in before.values()))


def test_iterative_schedule_ends_at_last_sparsity(tiny_dir, text_file):
    stages = [{"method": "sparsegpt", "sparsity": 0.3}, {**RECOVER, "steps": 3},
              {"method": "sparsegpt", "sparsity": 0.5}, {**RECOVER, "steps": 3}]
    record = _compress(tiny_dir, text_file, stages)
    assert len(record["recover"]) == 2
    assert record["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-3)
    model_weights = {n: r.dense() for n, r in record["results"].items()}
    for name, result in record["results"].items():
        assert torch.equal(model_weights[name] == 0, result.mask), name


def test_split_phases_and_presets():
    first, later = split_phases(load_recipe("iterative-sparse"))
    assert [s.method for s in first.stages] == ["sparsegpt"]
    assert [(s.method, r.stages[0].sparsity if r else None) for s, r in later] == [("recover", 0.5),
                                                                                    ("recover", None)]
    layers = [(n, m.in_features) for n, m in iter_linears(tiny_llama(hidden_size=128, intermediate_size=256))]
    for name in ("sparse50+recover", "2:4+recover", "w3g128+recover", "iterative-sparse"):
        assert name in PRESETS
        check_recipe(load_recipe(name), layers)


@pytest.mark.parametrize("stages, option", [
    ([{"method": "rtn", "group_size": 32}, {"method": "recover", "rank": 0}], "rank"),
    ([{"method": "rtn", "group_size": 32}, {"method": "recover", "temperature": 0}], "temperature"),
    ([{"method": "rtn", "group_size": 32}, {"method": "recover", "teacher": "other"}], "teacher"),
    ([{"method": "rtn", "group_size": 32}, {"method": "recover", "loss": "ce"}], "loss"),
    ([{"method": "rtn", "group_size": 32}, {"method": "recover", "max_seconds": 0}], "max_seconds"),
    ([{"method": "rtn", "group_size": 32}, {"method": "recover", "steps": 0}], "steps"),
    ([{"method": "rtn", "group_size": 32}, {"method": "recover", "lr": -1}], "lr"),
    ([{"method": "rtn", "group_size": 32}, {"method": "recover", "rnak": 4}], "rnak"),
])
def test_bad_options_name_the_option(stages, option):
    with pytest.raises(RecipeError, match=f"'{option}'"):
        parse_recipe(stages)


@pytest.mark.parametrize("stages, needle", [
    ([{"method": "recover"}, {"method": "rtn", "group_size": 32}], "before any compression"),
    ([{"method": "rtn", "group_size": 32}, {"method": "recover", "merge": False}, {"method": "recover"}], "'merge'"),
    ([{"method": "sparsegpt"}, {"method": "recover"}, {"method": "gptq"}], "pruned before a recover"),
    ([{"method": "rtn", "group_size": 32}, {"method": "recover", "targets": ["nothing*"]}], "selects no layer"),
])
def test_bad_recipes_fail_before_work(stages, needle):
    layers = [(n, m.in_features) for n, m in iter_linears(tiny_llama())]
    with pytest.raises(RecipeError, match=needle):
        check_recipe(parse_recipe(stages), layers)


def test_single_document_text_names_data(tiny_dir, tmp_path, text_file):
    single = tmp_path / "one.txt"
    single.write_text(" ".join(["the quick brown fox"] * 200))
    with pytest.raises(Exception, match="'data'"):
        _compress(tiny_dir, text_file, [{"method": "rtn", "group_size": 32}, {**RECOVER, "data": f"file:{single}"}])



def test_masked_lora_function_gradients_match_dense_reference():
    """The masked update's hand-written backward (no dense update kept) equals autograd through the dense form."""
    from lmshrink.methods.recover.lora import MaskedLoraFunction

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, dtype=torch.float64, generator=gen, requires_grad=True)
    a = torch.randn(4, 12, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(10, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    pruned = torch.rand(10, 12, generator=gen) < 0.5
    assert torch.autograd.gradcheck(lambda x, a, b: MaskedLoraFunction.apply(x, a, b, pruned, 0.7), (x, a, b))
    out = MaskedLoraFunction.apply(x, a, b, pruned, 0.7)
    reference = x @ ((b @ a) * 0.7 * (~pruned)).t()
    torch.testing.assert_close(out, reference)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, a, b), g)
    want = torch.autograd.grad(reference, (x, a, b), g)
    for left, right in zip(got, want):
        torch.testing.assert_close(left, right)


@pytest.mark.parametrize("temperature, lm_weight, kl_weight", [(1.0, 0.0, 1.0), (2.0, 0.5, 1.0), (1.0, 1.0, 0.0)])
def test_chunked_head_loss_matches_full_logits(temperature, lm_weight, kl_weight):
    """The chunked loss from hidden states + heads equals the full-logits loss, value and gradient."""
    from lmshrink.methods.recover.losses import distill_loss, head_distill_loss

    student, teacher = tiny_llama(seed=7), tiny_llama(seed=8)
    ids = _ids()
    with torch.no_grad():
        t_hidden = teacher.model(input_ids=ids).last_hidden_state
    s_hidden = student.model(input_ids=ids).last_hidden_state.detach().requires_grad_(True)
    student.lm_head.requires_grad_(False)
    chunked = head_distill_loss(s_hidden, t_hidden, student.lm_head, teacher.lm_head, ids, temperature, lm_weight,
                                kl_weight, chunk=7)
    (grad_chunked,) = torch.autograd.grad(chunked * 3.0, s_hidden)
    full = distill_loss(student.lm_head(s_hidden), teacher.lm_head(t_hidden), ids, temperature, lm_weight, kl_weight)
    (grad_full,) = torch.autograd.grad(full * 3.0, s_hidden)
    assert float(full) > 0
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_chunked, grad_full, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss", ["kl", "kl+mse"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(loss):
    from lmshrink.methods.recover.train import _head_path, checkpointed_blocks, step_loss

    peft_model, _, _, _ = _masked_peft()
    teacher = tiny_llama(seed=6).requires_grad_(False)
    stage = load_recipe({"stages": [{"method": "rtn", "group_size": 32},
                                    {**RECOVER, "loss": loss, "lm_weight": 0.3}]}).stages[1]
    student, teach = Forward(peft_model), Forward(teacher)
    assert _head_path(student, teach, ids=_ids())
    params = [p for p in peft_model.parameters() if p.requires_grad]
    outcomes = []
    for checkpointing in (False, True):
        with checkpointed_blocks(student.blocks) if checkpointing else contextlib.nullcontext():
            value = step_loss(student, teach, _ids(), stage, head=True)
            grads = torch.autograd.grad(value, params)
        outcomes.append((value.detach(), grads))
    (loss0, grads0), (loss1, grads1) = outcomes
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-7)
    assert any(float(g.abs().max()) > 0 for g in grads0)
    for g0, g1 in zip(grads0, grads1):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-8)
    assert "forward" not in student.blocks[0].__dict__  # the wrapper is removed on exit


def _held_out_hidden_error(tiny_dir, text_file, stage_options, results):
    """Mean normalized per-block hidden-state MSE of the recovered student against the teacher on held-out windows."""
    from lmshrink.methods.recover.losses import hidden_mse

    stage = load_recipe({"stages": [{"method": "rtn", "group_size": 32}, stage_options]}).stages[1]
    _, held = split_documents(load_text(f"file:{text_file}", "train"), tiny_tokenizer(),
                              stage.eval_windows * stage.seqlen * 2, stage.seed)
    ids = evaluation_windows(tiny_tokenizer(), held, stage.seqlen).input_ids[: stage.eval_windows]
    student = load_model(str(tiny_dir), progress=False).model
    for name, module in iter_linears(student):
        module.weight.data.copy_(results[name].dense())
    s_fwd, t_fwd = Forward(student), Forward(load_model(str(tiny_dir), progress=False).model)
    s_blocks, t_blocks = [], []
    with torch.no_grad(), s_fwd.capture(s_blocks), t_fwd.capture(t_blocks):
        s_fwd.hidden(ids)
        t_fwd.hidden(ids)
    return float(hidden_mse(s_blocks, t_blocks))


def test_hidden_mse_loss_lowers_the_hidden_state_error(tiny_dir, text_file):
    prune = {"method": "magnitude", "pattern": "2:4"}
    stages = {loss: {**RECOVER, "loss": loss, "hidden_weight": 1.0, "steps": 16} for loss in ("kl", "kl+mse")}
    errors = {loss: _held_out_hidden_error(tiny_dir, text_file, stage,
                                           _compress(tiny_dir, text_file, [prune, stage])["results"])
              for loss, stage in stages.items()}
    before = _held_out_hidden_error(tiny_dir, text_file, stages["kl"],
                                    _compress(tiny_dir, text_file, [prune])["results"])
    assert errors["kl+mse"] < errors["kl"] < before


def test_resume_inside_a_recover_stage_gives_identical_results(tiny_dir, text_file, tmp_path, monkeypatch):
    """A run killed after its second save (step 4 of 8) and resumed ends with the same weights and record as an
    uninterrupted run."""
    from lmshrink.methods.recover import train as distill

    stages = [{"method": "sparsegpt", "pattern": "2:4"}, {**RECOVER, "steps": 8, "eval_every": 3, "save_every": 2}]
    whole = _compress(tiny_dir, text_file, stages, out=tmp_path / "whole")
    real_save, calls = distill.save_state, []

    class Killed(Exception):
        pass

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(args[-1]["step"])
        if len(calls) == 2:
            raise Killed

    monkeypatch.setattr(distill, "save_state", save_then_die)
    with pytest.raises(Killed):
        _compress(tiny_dir, text_file, stages, out=tmp_path / "cut")
    assert calls == [2, 4] and (tmp_path / "cut.partial" / "recover-1").is_dir()
    monkeypatch.setattr(distill, "save_state", real_save)
    resumed = _compress(tiny_dir, text_file, stages, out=tmp_path / "cut", resume=True)
    rec_whole, rec_resumed = whole["recover"][0], resumed["recover"][0]
    assert rec_resumed["resumed_from_step"] == 4 and rec_whole["resumed_from_step"] is None
    for key in ("history", "held_out_before", "held_out_after", "held_out_after_merge", "best_step", "steps_run"):
        assert rec_resumed[key] == rec_whole[key], key
    for name, result in whole["results"].items():
        assert torch.equal(resumed["results"][name].dense(), result.dense()), name
    assert not (tmp_path / "cut.partial").exists()


def test_max_seconds_stops_training_and_is_recorded(tiny_dir, text_file, tmp_path, monkeypatch):
    """A fake clock (one second per reading) makes the time budget run out after a few steps: training stops, the
    adapters trained since the last evaluation are evaluated and kept if better, and lmshrink.json records it."""
    import types

    from lmshrink.methods.recover import train as distill

    clock = iter(range(10**6))
    monkeypatch.setattr(distill, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    stages = [{"method": "rtn", "bits": 3, "group_size": 32},
              {**RECOVER, "steps": 1000, "eval_every": 500, "max_seconds": 20}]
    record = _compress(tiny_dir, text_file, stages, out=tmp_path / "out")
    rec = record["recover"][0]
    assert rec["stopped_by"] == "max_seconds" and 0 < rec["steps_run"] < 1000
    assert [h["step"] for h in rec["history"]] == [0, rec["steps_run"]]
    assert rec["best_step"] == rec["steps_run"]  # the last adapters were better than none: not thrown away
    assert rec["held_out_after_merge"]["kl"] < rec["held_out_before"]["kl"]
    saved = json.loads((tmp_path / "out" / "lmshrink.json").read_text())
    assert saved["recover"][0]["max_seconds"] == 20 and saved["recover"][0]["stopped_by"] == "max_seconds"
    assert "before recovery" in saved["summary"]["rel_output_error_measured"]


@pytest.mark.parametrize("merged_kl, quantized, warns", [(0.44, True, True), (0.36, False, True), (0.34, True, False)])
def test_merge_that_loses_the_held_out_gain_warns_and_names_the_fix(merged_kl, quantized, warns):
    """KL 0.45 before, 0.25 with the adapters: a merged model at 0.44 keeps 5% of the gain (warn, and for quantized
    layers under round-to-nearest suggest requantize: gptq), at 0.34 it keeps 55% (no warning)."""
    from lmshrink.methods.recover.stage import RecoverStage
    from lmshrink.methods.recover.train import _check_merge_kept_gain

    record = {"held_out_after_merge": {"kl": merged_kl},
              "merge": {"quantized_codes_changed": 0.0 if quantized else None}}
    with warnings_recorder() as caught:
        _check_merge_kept_gain(record, {"kl": 0.45}, {"kl": 0.25}, RecoverStage(method="recover"))
    assert record["merge"]["gain_kept"] == pytest.approx((0.45 - merged_kl) / 0.2)
    assert bool(caught) == warns and ("merge_warning" in record) == warns
    if warns:
        assert "merge: false" in record["merge_warning"]
        assert ("requantize: gptq" in record["merge_warning"]) == quantized
    # no gain to keep (the adapters did not help): nothing recorded, no warning
    record = {"held_out_after_merge": {"kl": 0.45}, "merge": {}}
    _check_merge_kept_gain(record, {"kl": 0.45}, {"kl": 0.45}, RecoverStage(method="recover"))
    assert record == {"held_out_after_merge": {"kl": 0.45}, "merge": {}}


@contextlib.contextmanager
def warnings_recorder():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def test_wikitext_splits_keep_each_article_on_one_side():
    from lmshrink.data.sources import TextSource

    rows, article_of = [" "], {}
    for article in range(8):
        texts = [f" = Article {article} = ", f" Text of article {article} , first paragraph . " * 4,
                 f" = = Section {article} = = ", f" Text of article {article} , second paragraph . " * 4]
        article_of.update({text: article for text in texts})
        rows += [texts[0], " ", texts[1], texts[2], texts[3]]
    source = TextSource(name="wikitext2", split="train", documents=rows, join="\n\n", origin="test")
    train, held = split_documents(source, tiny_tokenizer(), 200, seed=0)
    owner = {}
    for part, src in (("train", train), ("held", held)):
        for row in src.documents:
            if row.strip():
                owner.setdefault(article_of[row], set()).add(part)
    assert {"held"} in owner.values() and {"train"} in owner.values()
    assert all(len(parts) == 1 for parts in owner.values())  # no article on both sides
    assert len(train.documents) + len(held.documents) == len(rows)
