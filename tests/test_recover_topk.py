"""The recover stage's top-k teacher cache (``teacher_cache: topk``) on tiny random Llamas: the KL over k + 1 outcomes
equals the full KL when k is the vocabulary, is a lower bound of it otherwise and close to it for a peaked teacher;
the chunked loss matches the full-logits one; a recovery run from the cache lowers the held-out KL (measured exactly,
as without the cache), frees the teacher's blocks and removes its temporary cache; a resumed run reuses the cache; and
options that need the teacher's hidden states are refused naming the option."""

import json
import weakref

import pytest
import torch
from helpers import save_tiny_llama, tiny_llama, write_word_paragraphs

from lmshrink import compress, load_model
from lmshrink.methods.recover.losses import distill_loss, topk_distill_loss, topk_head_distill_loss, topk_kl
from lmshrink.methods.recover.teacher_cache import block_bytes, open_cache, release_blocks, topk_logprobs
from lmshrink.pipeline.phases import snapshot_teacher
from lmshrink.pipeline.recipe import RecipeError, parse_recipe

VOCAB = 300
RECOVER = {"method": "recover", "steps": 12, "seqlen": 32, "batch": 4, "lr": 3e-3, "eval_windows": 4, "rank": 4,
           "alpha": 8, "eval_every": 4, "patience": 0, "teacher_cache": "topk", "teacher_topk": 16}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-topk"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_word_paragraphs(tmp_path_factory.mktemp("text") / "text.txt", ("the quick brown fox jumps over lazy dog pruning sets some weights to zero model quality grid a "
             "language keeps most of their"))


def _compress(tiny_dir, text_file, stages, out=None, **kw):
    return compress(load_model(str(tiny_dir), progress=False), {"stages": stages}, output=out,
                    calibration=f"file:{text_file}", nsamples=4, seqlen=32, progress=False, overwrite=True, **kw)


def _pair(scale: float = 1.0):
    """Student and teacher final hidden states of the same ids, the teacher's head scaled by ``scale`` (a larger
    scale makes the teacher's distributions more peaked)."""
    student, teacher = tiny_llama(seed=7), tiny_llama(seed=8)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(scale)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        t_hidden = teacher.model(input_ids=ids).last_hidden_state
    s_hidden = student.model(input_ids=ids).last_hidden_state.detach().requires_grad_(True)
    student.lm_head.requires_grad_(False)
    return student, teacher, ids, s_hidden, t_hidden


def _cache(teacher, t_hidden, k, temperature):
    logp, tids = topk_logprobs(t_hidden[:, :-1].reshape(-1, t_hidden.shape[-1]), teacher.lm_head, k, temperature,
                               chunk=5)
    b, n = t_hidden.shape[0], t_hidden.shape[1] - 1
    return logp.reshape(b, n, -1), tids.reshape(b, n, -1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kl_with_whole_vocabulary_equals_full_kl(temperature):
    student, teacher, ids, s_hidden, t_hidden = _pair()
    full = distill_loss(student.lm_head(s_hidden), teacher.lm_head(t_hidden), ids, temperature, 0.0)
    (grad_full,) = torch.autograd.grad(full, s_hidden)
    logp, tids = _cache(teacher, t_hidden, VOCAB, temperature)
    assert tids.shape[-1] == VOCAB and torch.equal(tids.sort(-1).values[0, 0], torch.arange(VOCAB))
    exact = topk_distill_loss(student.lm_head(s_hidden), logp, tids, ids, temperature, 0.0)
    (grad_exact,) = torch.autograd.grad(exact, s_hidden)
    assert float(full.detach()) > 0.01
    torch.testing.assert_close(exact, full, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_exact, grad_full, rtol=1e-4, atol=1e-8)
    # as stored on disk: float16 log-probabilities
    stored = topk_distill_loss(student.lm_head(s_hidden), logp.half().float(), tids, ids, temperature, 0.0)
    assert float(stored.detach()) == pytest.approx(float(full.detach()), rel=1e-3)


def test_small_k_is_a_lower_bound_and_close_for_a_peaked_teacher():
    gaps = {}
    for scale in (1.0, 40.0):
        student, teacher, ids, s_hidden, t_hidden = _pair(scale)
        s_logits = student.lm_head(s_hidden).detach()
        full = float(distill_loss(s_logits, teacher.lm_head(t_hidden), ids, 1.0, 0.0))
        values = []
        for k in (1, 4, 16, 64, VOCAB - 1):
            logp, tids = _cache(teacher, t_hidden, k, 1.0)
            value = float(topk_distill_loss(s_logits, logp, tids, ids, 1.0, 0.0))
            assert 0 <= value <= full + 1e-6, (scale, k)
            values.append(value)
            if k == 16:
                gaps[scale] = (1 - value / full, float(logp[..., -1].exp().mean()))  # relative gap, rest mass
        assert values == sorted(values)  # merging fewer tokens never gives a smaller KL
        assert values[-1] == pytest.approx(full, rel=1e-4)
    flat_gap, flat_rest = gaps[1.0]
    peaked_gap, peaked_rest = gaps[40.0]
    assert flat_rest > 0.5 and peaked_rest < 0.02  # the scaled teacher is peaked: little mass outside its top 16
    assert flat_gap > 0.3 and peaked_gap < 0.01


@pytest.mark.parametrize("k, lm_weight, scale", [(VOCAB, 0.0, 1.0), (16, 0.0, 1.0), (16, 0.5, 1.0), (4, 0.0, 40.0)])
def test_chunked_topk_loss_matches_full_logits(k, lm_weight, scale):
    """The chunked loss (hand-written gradient) equals autograd through the full-logits loss, value and gradient."""
    student, teacher, ids, s_hidden, t_hidden = _pair(scale)
    logp, tids = _cache(teacher, t_hidden, k, 2.0)
    chunked = topk_head_distill_loss(s_hidden, student.lm_head, logp, tids, ids, 2.0, lm_weight, chunk=7)
    (grad_chunked,) = torch.autograd.grad(chunked * 3.0, s_hidden)
    full = topk_distill_loss(student.lm_head(s_hidden), logp, tids, ids, 2.0, lm_weight)
    (grad_full,) = torch.autograd.grad(full * 3.0, s_hidden)
    # the KL is a small difference of two large float32 sums whose order depends on the CPU's vector width: agreement
    # to 1e-4 relative (a mistake in a term moves it by orders of magnitude more)
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_chunked, grad_full, rtol=1e-4, atol=1e-8)
    assert float(grad_full.abs().max()) > 0


def test_topk_kl_is_zero_when_the_student_equals_the_teacher():
    _, teacher, ids, _, t_hidden = _pair()
    logp, tids = _cache(teacher, t_hidden, 16, 1.0)
    value = topk_kl(teacher.lm_head(t_hidden)[:, :-1], logp, tids)
    assert float(value.abs().max()) < 1e-5


def test_released_teacher_blocks_free_their_memory_and_leave_the_student():
    model = tiny_llama(seed=2)
    teacher = snapshot_teacher(model)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    blocks = list(teacher.model.layers)
    size = block_bytes(blocks)
    assert size == block_bytes(list(model.model.layers)) > 0
    alive = weakref.ref(blocks[0].mlp.up_proj.weight)
    assert release_blocks(blocks, keep=model) == size
    assert block_bytes(blocks) == 0 and alive() is None  # nothing else kept the teacher's tensors
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    assert teacher.lm_head.weight is model.lm_head.weight  # shared, kept


def test_topk_recovery_lowers_held_out_kl_and_frees_the_teacher(tiny_dir, text_file):
    """Magnitude 2:4, then recovery from a top-16 cache (of a 300-token vocabulary): the held-out KL (exact, the same
    before training as an on-the-fly run's) falls, by at least half as much as with the on-the-fly teacher."""
    from pathlib import Path

    prune = {"method": "magnitude", "pattern": "2:4"}
    rec = _compress(tiny_dir, text_file, [prune, {**RECOVER, "steps": 16}])["recover"][0]
    plain = _compress(tiny_dir, text_file, [prune, {**RECOVER, "steps": 16, "teacher_cache": "none"}])["recover"][0]
    cache = rec["teacher_cache"]
    assert cache["mode"] == "topk" and cache["k"] == 16 and cache["teacher_blocks_freed"]
    assert cache["training_windows"] == rec["data"]["training_windows"] and cache["bytes"] > 0
    assert cache["teacher_block_bytes"] > 0 and not cache["reused"]
    assert rec["loss_path"] == "chunked output head, top-k teacher cache" and plain["teacher_cache"]["mode"] == "none"
    assert not Path(cache["folder"]).exists()  # no work folder: a temporary cache, removed
    for key in ("kl", "ppl", "teacher_ppl"):
        assert rec["held_out_before"][key] == pytest.approx(plain["held_out_before"][key], rel=1e-6)
    before = rec["held_out_before"]["kl"]
    reduction = 1 - rec["held_out_after_merge"]["kl"] / before
    assert reduction > 0.2 and reduction > 0.5 * (1 - plain["held_out_after_merge"]["kl"] / before)
    print(f"\ntiny Llama: top-k cache {cache['bytes']} bytes ({cache['training_windows']} windows x "
          f"{RECOVER['seqlen'] - 1} positions, k={cache['k']}), teacher blocks {cache['teacher_block_bytes']} bytes; "
          f"held-out KL {before:.5f} -> {rec['held_out_after_merge']['kl']:.5f} (on the fly: "
          f"{plain['held_out_after_merge']['kl']:.5f})")


def test_resumed_run_reuses_the_cache(tiny_dir, text_file, tmp_path, monkeypatch):
    from lmshrink.methods.recover import train as distill

    stages = [{"method": "sparsegpt", "pattern": "2:4"}, {**RECOVER, "steps": 8, "eval_every": 3, "save_every": 2}]
    whole = _compress(tiny_dir, text_file, stages, out=tmp_path / "whole")
    real_save, real_write, calls, writes = distill.save_state, distill.write_cache, [], []

    class Killed(Exception):
        pass

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(args[-1]["step"])
        if len(calls) == 2:
            raise Killed

    def counted_write(*args, **kwargs):
        writes.append(args[0])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(distill, "write_cache", counted_write)
    monkeypatch.setattr(distill, "save_state", save_then_die)
    with pytest.raises(Killed):
        _compress(tiny_dir, text_file, stages, out=tmp_path / "cut")
    folder = tmp_path / "cut.partial" / "recover-1-teacher-topk"
    assert writes == [folder] and (folder / "meta.json").is_file()
    key = json.loads((folder / "meta.json").read_text())["key"]
    assert open_cache(folder, key) is not None and open_cache(folder, key + "x") is None
    monkeypatch.setattr(distill, "save_state", real_save)
    resumed = _compress(tiny_dir, text_file, stages, out=tmp_path / "cut", resume=True)
    assert writes == [folder]  # not written again
    rec_whole, rec_resumed = whole["recover"][0], resumed["recover"][0]
    assert rec_resumed["teacher_cache"]["reused"] and not rec_whole["teacher_cache"]["reused"]
    assert rec_resumed["resumed_from_step"] == 4
    for key in ("history", "held_out_before", "held_out_after", "held_out_after_merge", "best_step", "steps_run"):
        assert rec_resumed[key] == rec_whole[key], key
    for name, result in whole["results"].items():
        assert torch.equal(resumed["results"][name].dense(), result.dense()), name
    assert not (tmp_path / "cut.partial").exists()


@pytest.mark.parametrize("options, needles", [
    ({"loss": "mse", "teacher_cache": "topk"}, ["'teacher_cache'", "loss 'kl'", "teacher_cache 'none'"]),
    ({"loss": "kl+mse", "teacher_cache": "topk"}, ["'teacher_cache'", "loss 'kl'"]),
    ({"teacher_cache": "topk", "teacher_topk": 0}, ["'teacher_topk'"]),
    ({"teacher_cache": "disk"}, ["'teacher_cache'"]),
])
def test_bad_options_name_the_option_and_the_fix(options, needles):
    with pytest.raises(RecipeError) as info:
        parse_recipe([{"method": "rtn", "group_size": 32}, {"method": "recover", **options}])
    for needle in needles:
        assert needle in str(info.value)


def test_topk_with_max_seconds_warns_that_the_cache_covers_every_window():
    from lmshrink.models.adapters import iter_linears
    from lmshrink.pipeline.checks import check_recipe

    layers = [(n, m.in_features) for n, m in iter_linears(tiny_llama())]
    recipe = parse_recipe([{"method": "rtn", "group_size": 32},
                           {"method": "recover", "teacher_cache": "topk", "max_seconds": 60, "steps": 50}])
    with pytest.warns(UserWarning, match="all 200 training windows"):
        check_recipe(recipe, layers)
