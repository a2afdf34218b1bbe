"""Zero-shot tasks: lm-eval prompts, tokenization split, batched scoring, acc / acc_norm, data errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny_llama, tiny_tokenizer

from lmshrink.core.errors import DataSourceError, LmshrinkError
from lmshrink.eval.tasks.datafiles import load_docs
from lmshrink.eval.tasks.metrics import aggregate, choose, mean_stderr
from lmshrink.eval.tasks.registry import TASKS, list_tasks, resolve_task_names
from lmshrink.eval.tasks.runner import evaluate_tasks
from lmshrink.eval.tasks.scoring import encode_pair, loglikelihoods
from lmshrink.eval.tasks.spec import Item

SHARED_SIX = ["piqa", "arc_easy", "boolq", "winogrande", "lambada_openai", "sst2"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Missing-file tests must not wait on the hub fallback.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=3), tiny_tokenizer()


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log p(continuation tokens | preceding tokens), one unpadded forward, no helper code."""
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    targets = whole[n_context:]
    picked = [logprobs[pos - 1, tok].item() for pos, tok in zip(range(n_context, len(whole)), targets)]
    greedy = all(logprobs[pos - 1].argmax().item() == tok for pos, tok in zip(range(n_context, len(whole)), targets))
    return sum(picked), greedy


def test_two_choice_item_matches_direct_computation(tiny):
    model, tok = tiny
    context = "Question: what does pruning do?\nAnswer:"
    choices = ["sets weights to zero", "rounds weights to a grid of values"]
    requests = [(context, " " + c) for c in choices]
    # Pad the batch with other lengths so right-padding and the kept-logits tail are exercised.
    others = [("The quick brown fox", " jumps"), ("A model", " that fits on a cheaper machine is a model")]
    scores = loglikelihoods(model, tok, requests + others, batch_size=4, progress=False)
    for (ctx, cont), (score, greedy) in zip(requests + others, scores):
        expected, expected_greedy = direct_loglikelihood(model, tok, ctx, cont)
        assert score == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy
    record = choose(Item(requests=requests, gold=0, choices=choices), scores[:2])
    assert record["pred"] == int(scores[1][0] > scores[0][0])
    norm = [scores[i][0] / len(choices[i]) for i in range(2)]
    assert record["pred_norm"] == int(norm[1] > norm[0])


def test_batch_size_does_not_change_scores(tiny):
    model, tok = tiny
    requests = [("Compression of language models", " after training"), ("Quantization rounds", " weights"),
                ("Quantization rounds", " biases"), ("x", " keeps most of their quality.")]
    one = loglikelihoods(model, tok, requests, batch_size=1, progress=False)
    many = loglikelihoods(model, tok, requests, batch_size=8, progress=False)
    assert [s for s, _ in one] == pytest.approx([s for s, _ in many], abs=1e-4)


@pytest.mark.parametrize("batch_size", [1, 8])
def test_shared_context_cache_equals_full_sequences_and_runs_fewer_tokens(tiny, batch_size):
    """Choices scored on the context's key/value cache give the full-sequence scores (and the direct computation),
    and the model sees fewer tokens; one-token answers, truncated requests and unshared contexts mix in."""
    model, tok = tiny
    background = "Post-training compression makes a trained model smaller without training it again. "
    contexts = [background + "Question: which method needs no calibration data?\nAnswer:",
                background + "Question: what is 2:4 sparsity?\nAnswer:"]
    choices = [" magnitude pruning", " Wanda", " SparseGPT with a long explanation of the mask", " GPTQ", " yes"]
    # also: a context too short to be worth sharing (its choices run as full sequences), a lone request, and
    # one-token answers (identical inputs, one forward)
    requests = [(c, ch) for c in contexts for ch in choices] + [
        ("Goal:", " a long answer that is much longer than its goal"), ("Goal:", " another long answer, longer still"),
        ("A lone context", " and its only continuation"), ("yes or", " no"), ("yes or", " maybe")]
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"].numel()),
                                           with_kwargs=True)
    try:
        shared = loglikelihoods(model, tok, requests, batch_size=batch_size, progress=False, share_context=True)
        shared_tokens = sum(seen)
        seen.clear()
        full = loglikelihoods(model, tok, requests, batch_size=batch_size, progress=False, share_context=False)
        full_tokens = sum(seen)
    finally:
        hook.remove()
    assert [s for s, _ in shared] == pytest.approx([s for s, _ in full], abs=1e-4)
    assert [g for _, g in shared] == [g for _, g in full]
    for (ctx, cont), (score, greedy) in zip(requests, shared):
        expected, expected_greedy = direct_loglikelihood(model, tok, ctx, cont)
        assert score == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy
    assert shared_tokens < full_tokens  # each shared context runs once instead of once per choice
    # which contexts were shared: only the two long ones
    from lmshrink.eval.tasks.scoring import _worth_sharing
    for ctx, members in [(contexts[0], requests[:5]), ("Goal:", requests[10:12])]:
        pairs = [encode_pair(tok, c, ch) for c, ch in members]
        prepared = [(tuple((c + k)[:-1]), k) for c, k in pairs]
        assert _worth_sharing(tuple(pairs[0][0]), prepared) == (ctx != "Goal:")


def test_left_truncation_to_max_length(tiny):
    model, tok = tiny
    context = "The quick brown fox jumps over the lazy dog. " * 6 + "The end"
    ctx_ids, cont_ids = encode_pair(tok, context, " of the story")
    max_length = 20
    assert len(ctx_ids) + len(cont_ids) > max_length + 1
    (score, _), = loglikelihoods(model, tok, [(context, " of the story")], max_length=max_length, progress=False)
    window = (ctx_ids + cont_ids)[-(max_length + 1):]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([window[:-1]])).logits[0], dim=-1)
    n = len(cont_ids)
    expected = sum(logprobs[len(window) - 1 - n + i, t].item() for i, t in enumerate(cont_ids))
    assert score == pytest.approx(expected, abs=1e-4)


def test_encode_pair_moves_trailing_space_and_splits_whole_encoding():
    tok = tiny_tokenizer()
    ctx, cont = encode_pair(tok, "The quick brown ", "fox")
    assert ctx == tok.encode("The quick brown")
    assert ctx + cont == tok.encode("The quick brown fox")
    # Empty context: the prefix (BOS) token is the context.
    ctx, cont = encode_pair(tok, "", " fox")
    assert ctx == [tok.bos_token_id] and cont == tok.encode(" fox", add_special_tokens=False)


def test_acc_and_acc_norm_differ_when_choice_lengths_differ():
    item = Item(requests=[("q", " no"), ("q", " a much longer answer")], gold=1,
                choices=["no", "a much longer answer"])
    record = choose(item, [(-3.0, False), (-8.0, False)])
    # raw sum prefers the short choice; per character the long one wins (-8/20 > -3/2)
    assert (record["pred"], record["pred_norm"]) == (0, 1)
    assert (record["acc"], record["acc_norm"]) == (0.0, 1.0)
    ties = choose(item, [(-2.0, False), (-2.0, False)])
    assert ties["pred"] == 0  # np.argmax: first of equals


def test_aggregate_stderr_and_perplexity():
    records = [{"acc": v, "acc_norm": v} for v in (1.0, 0.0, 1.0, 1.0)]
    metrics = aggregate("multiple_choice", ("acc", "acc_norm"), records)
    assert metrics["acc"] == 0.75
    assert metrics["acc_stderr"] == pytest.approx(math.sqrt(0.75 / 3) / math.sqrt(4), rel=1e-9)  # sample sd / sqrt(n)
    assert mean_stderr([1.0]) is None
    lam = aggregate("loglikelihood", ("acc", "perplexity"),
                    [{"loglikelihood": -1.0, "greedy": True}, {"loglikelihood": -3.0, "greedy": False}])
    assert lam["perplexity"] == pytest.approx(math.exp(2.0))
    assert lam["acc"] == 0.5 and lam["perplexity_stderr"] > 0


def test_bad_task_names_list_known_tasks():
    with pytest.raises(LmshrinkError) as err:
        resolve_task_names("piqa,not_a_task")
    message = str(err.value)
    assert "not_a_task" in message
    for name in list_tasks():
        assert name in message


def test_all_expands_to_the_six_shared_tasks():
    assert resolve_task_names("all") == SHARED_SIX
    assert resolve_task_names(["sst2", "ALL"])[0] == "sst2" and len(resolve_task_names("sst2,all")) == 6
    assert set(list_tasks()) >= set(SHARED_SIX) | {"arc_challenge", "openbookqa", "hellaswag"}


def test_missing_data_file_names_expected_path(tmp_path, tiny):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    with pytest.raises(DataSourceError) as err:
        evaluate_tasks(*tiny, "piqa", data_dir=tmp_path, progress=False)
    assert str(tmp_path / "piqa" / "valid-labels.lst") in str(err.value)
    assert "--data-dir" in str(err.value)
    with pytest.raises(DataSourceError) as err:
        load_docs(TASKS["sst2"], tmp_path)
    assert str(tmp_path / "sst2" / "dev.tsv") in str(err.value)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSHRINK_DATA", str(tmp_path))
    with pytest.raises(DataSourceError) as err:
        evaluate_tasks(tiny_llama(), tiny_tokenizer(), "boolq", progress=False)
    assert str(tmp_path / "boolq" / "val.jsonl") in str(err.value)


def test_shared_files_give_lm_eval_prompts(shared_data):
    piqa, _ = load_docs(TASKS["piqa"], shared_data)
    item = TASKS["piqa"].to_item(piqa[0])
    assert item.requests[0] == ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
                                " " + piqa[0]["sol1"])
    assert item.gold == 0 and len(piqa) == 1838

    arc, _ = load_docs(TASKS["arc_easy"], shared_data)
    item = TASKS["arc_easy"].to_item(arc[0])
    assert item.requests[0][0] == ("Question: Which statement best explains why photosynthesis is the foundation "
                                   "of most food webs?\nAnswer:")
    assert [r[1] for r in item.requests][0] == " Sunlight is the source of energy for nearly all ecosystems."
    assert item.gold == 0 and len(arc) == 2376
    numeric = next(d for d in arc if d["answerKey"] == "3")
    assert TASKS["arc_easy"].to_item(numeric).gold == numeric["choices"]["label"].index("3")

    boolq, _ = load_docs(TASKS["boolq"], shared_data)
    item = TASKS["boolq"].to_item(boolq[0])
    assert item.requests[0][0] == (boolq[0]["passage"] + "\nQuestion: does ethanol take more energy make that "
                                   "produces?\nAnswer:")
    assert [r[1] for r in item.requests] == [" no", " yes"] and item.gold == 0 and len(boolq) == 3270

    wino, _ = load_docs(TASKS["winogrande"], shared_data)
    item = TASKS["winogrande"].to_item(wino[0])
    assert item.requests == [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                             ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    assert item.gold == 1 and len(wino) == 1267

    lambada, _ = load_docs(TASKS["lambada_openai"], shared_data)
    item = TASKS["lambada_openai"].to_item(lambada[0])
    assert item.requests[0][1] == " signs" and item.requests[0][0] + item.requests[0][1] == lambada[0]["text"]
    assert len(lambada) == 5153

    sst2, _ = load_docs(TASKS["sst2"], shared_data)
    item = TASKS["sst2"].to_item(sst2[1])
    assert item.requests == [("unflinchingly bleak and desperate \nQuestion: Is this sentence positive or "
                              "negative?\nAnswer:", " negative"),
                             ("unflinchingly bleak and desperate \nQuestion: Is this sentence positive or "
                              "negative?\nAnswer:", " positive")]
    assert item.gold == 0 and len(sst2) == 872


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_loaders_for_release_layouts(tmp_path):
    arc_row = {"id": "x", "question": {"stem": "Which is a gas?", "choices": [
        {"text": "ice", "label": "A"}, {"text": "steam", "label": "B"}]}, "answerKey": "B"}
    _write_jsonl(tmp_path / "arc-challenge" / "ARC-Challenge-Test.jsonl", [arc_row])
    _write_jsonl(tmp_path / "openbookqa" / "test.jsonl", [arc_row])
    _write_jsonl(tmp_path / "hellaswag" / "hellaswag_val.jsonl", [{
        "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering the window.",
        "ctx_b": "a woman", "endings": ["walks [title] away.", "drives off."], "label": 1}])
    _write_jsonl(tmp_path / "winogrande" / "winogrande.jsonl", [
        {"sentence": "The cup fell off the table because _ was round.", "option1": "the cup", "option2": "the table",
         "answer": ""}])
    (tmp_path / "winogrande" / "dev-labels.lst").write_text("1\n")

    item = TASKS["arc_challenge"].to_item(load_docs(TASKS["arc_challenge"], tmp_path)[0][0])
    assert item.requests == [("Question: Which is a gas?\nAnswer:", " ice"), ("Question: Which is a gas?\nAnswer:",
                                                                             " steam")] and item.gold == 1
    item = TASKS["openbookqa"].to_item(load_docs(TASKS["openbookqa"], tmp_path)[0][0])
    assert item.requests[1] == ("Which is a gas?", " steam") and item.gold == 1
    item = TASKS["hellaswag"].to_item(load_docs(TASKS["hellaswag"], tmp_path)[0][0])
    assert item.requests[0] == ("Removing ice from car: Then, the man writes over the snow covering the window. "
                                "A woman", " walks. away.")
    assert item.choices == ["walks. away.", "drives off."] and item.gold == 1
    item = TASKS["winogrande"].to_item(load_docs(TASKS["winogrande"], tmp_path)[0][0])
    assert item.requests == [("The cup fell off the table because the cup", " was round."),
                             ("The cup fell off the table because the table", " was round.")] and item.gold == 0


def test_evaluate_tasks_on_shared_data(shared_data, tiny):
    model, tok = tiny
    results = evaluate_tasks(model, tok, "all", data_dir=shared_data, limit=3, batch_size=4, progress=False,
                             keep_items=True)
    assert list(results) == SHARED_SIX
    for name, result in results.items():
        assert result["n"] == 3 and result["seconds"] >= 0
        assert 0.0 <= result["metrics"]["acc"] <= 1.0
        assert result["protocol"]["source"].startswith(str(shared_data))
        assert result["protocol"]["max_length"] == 256 and result["protocol"]["bos_added"] is False
    assert set(results["piqa"]["metrics"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert results["lambada_openai"]["metrics"]["perplexity"] > 1.0
    # BoolQ passages exceed the tiny model's 256 positions: the left-truncated scores must still be finite.
    assert all(math.isfinite(ll) for rec in results["boolq"]["items"] for ll in rec["loglikelihoods"])
    acc = results["piqa"]["metrics"]["acc"]
    assert acc == sum(r["pred"] == r["gold"] for r in results["piqa"]["items"]) / 3


def test_bos_follows_the_tokenizer_default_like_lm_eval():
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    base = tiny_tokenizer()
    backend = base.backend_tokenizer.__class__.from_str(base.backend_tokenizer.to_str())
    bos = base.bos_token_id
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    ctx, cont = encode_pair(tok, "The quick brown", " fox")
    assert ctx[0] == bos and ctx.count(bos) == 1 and bos not in cont
    assert ctx + cont == tok.encode("The quick brown fox")
    # A context that already starts with the BOS text gets no second BOS.
    ctx, _ = encode_pair(tok, "<s>The quick brown", " fox")
    assert ctx.count(bos) == 1
