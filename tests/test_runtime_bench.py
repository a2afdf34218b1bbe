"""`lmshrink bench` end to end on a tiny model (no timing is asserted: only that the record is complete)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from helpers import tiny_llama, tiny_tokenizer

from lmshrink.cli import main
from lmshrink.core.errors import LmshrinkError
from lmshrink.core.grids import GridSpec
from lmshrink.eval.bench import bench
from lmshrink.formats.save import save_quantized
from lmshrink.methods.quant.rtn import rtn_quantize
from lmshrink.models.adapters import iter_linears, linear_weight, set_linear_weight


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    model = tiny_llama(num_hidden_layers=2)
    model.save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    results = {}
    for name, module in iter_linears(model):
        result = rtn_quantize(linear_weight(module).float().clone(), GridSpec(bits=4, group_size=32))
        set_linear_weight(module, result.weight)
        results[name] = result
    save_quantized(model, tiny_tokenizer(), results, root / "w4g32")
    return root / "base", root / "w4g32"


@pytest.fixture(scope="module")
def record(folders):
    base, compressed = folders
    # the only run that starts worker processes (each imports torch and transformers); decode="all": an hf
    # (transformers' forward), a fast (FastDecoder) and a fast-q8 (FastDecoder, int8 activations and lm_head) row
    # per model, the last only where the AVX2 kernel builds
    return bench([str(base), str(compressed)], prompt_tokens=16, new_tokens=4, trials=2, warmup=1, threads=1,
                 progress=False, decode="all")


def test_bench_reports_both_models_side_by_side(record):
    # 4-bit layers run lmshrink's AVX2 kernel where it builds, torch's int4 kernel elsewhere
    from lmshrink.runtime import cpu_kernels

    avx2 = cpu_kernels.available()
    q8 = ["fast-q8"] if avx2 else []
    assert [(row["runtime"], row["decode"]) for row in record["models"]] == [
        (runtime, path) for runtime in ("dense", "packed") for path in ["hf", "fast"] + q8]
    by_path = {(row["runtime"], row["decode"]): row for row in record["models"]}
    first, first_fast = by_path["dense", "hf"], by_path["dense", "fast"]
    second, second_fast = by_path["packed", "hf"], by_path["packed", "fast"]
    assert second["model"]["extra"]["packed_layers"] == {"int4_avx2" if avx2 else "int4": 14}
    for row in record["models"]:
        assert len(row["trials"]) == 2
        for key in ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s"):
            assert row[key] > 0
        assert row["peak_rss_bytes"] >= row["rss_after_load_bytes"] > 0
        running = row["peak_rss_running_bytes"]
        assert running is None or 0 < running <= row["peak_rss_bytes"]
        assert row["prompt_source"].startswith("enwiki-sample eval text")
        assert len(row["tokens"]) == 5
        assert row["threads"] == 1
        assert row["decode_cpu_tokens_per_s"] > 0
    assert first["vs_first"]["decode_speedup"] == 1.0
    # the same trial through both paths: the same prompt ids and, for the fp32 model, the same greedy tokens
    assert first_fast["prompt_source"] == first["prompt_source"]
    assert first_fast["tokens"] == first["tokens"] and first_fast["same_greedy_prefix_as_first"] == 5
    assert second_fast["tokens"] == second["tokens"]
    assert first_fast["size"] == first["size"] and second_fast["size"] == second["size"]
    if avx2:
        assert second_fast["fast_linears"]["qkv:int4_avx2:fused"] == 2
        q8_row = by_path["packed", "fast-q8"]
        assert q8_row["fast_linears"]["qkv:int4_avx2_q8:fused"] == 2 and q8_row["fast_linears"]["lm_head:q8"] == 1
        assert by_path["dense", "fast-q8"]["fast_linears"]["lm_head:q8"] == 1
        assert len(q8_row["tokens"]) == 5 and q8_row["prompt_source"] == second["prompt_source"]
        assert "fast_skipped" not in record["protocol"]
    else:  # no kernel: the fast-q8 rows are skipped with the reason
        assert all("AVX2" in reason for reason in record["protocol"]["fast_skipped"].values())
    assert {"fast", "fast-q8"} <= set(record["protocol"]["decode_paths"])
    # torch's int4: 4-bit codes plus a bf16 scale and offset per 32 weights: 5 bits of 32 (fp32) -> 5/32 of the
    # fp32 bytes; the AVX2 kernel: a float32 scale and a uint8 zero point per 32 weights: 5.25 bits
    assert second["vs_first"]["linear_bytes_ratio"] == pytest.approx((5.25 if avx2 else 5) / 32)
    assert second["linear_bytes_vs_fp16"] == pytest.approx((5.25 if avx2 else 5) / 16)
    assert record["protocol"]["threads"] == 1 and record["protocol"]["prompt_tokens"] == 16


def test_linear_bytes_count_gpt2_conv1d_layers_and_empty_ratios_are_none():
    from tiny_families import tiny_model

    from lmshrink.eval.bench import _linear_bytes

    model = tiny_model("gpt2")  # its block linears are transformers Conv1D layers
    linear = sum(linear_weight(module).numel() for _, module in iter_linears(model))
    assert linear > 0
    assert _linear_bytes(model) == {"linear_weight_bytes": 4 * linear, "linear_weights": linear}
    # with no linear weights counted there is nothing to compare with: None, not a ZeroDivisionError
    from lmshrink.eval.bench import _compare

    speed = {"decode_tokens_per_s": 4.0, "decode_cpu_tokens_per_s": 4.0, "prefill_tokens_per_s": 8.0}
    rows = [{**speed, "size": {"linear_weight_bytes": 0, "linear_weights": 0}},
            {**speed, "size": {"linear_weight_bytes": 64, "linear_weights": 128}}]
    _compare(rows)
    assert rows[0]["linear_bytes_vs_fp16"] is None and rows[1]["vs_first"]["linear_bytes_ratio"] is None
    assert rows[1]["linear_bytes_vs_fp16"] == 0.25 and rows[1]["vs_first"]["decode_speedup"] == 1.0


def test_bench_cli_prints_the_table_and_refuses_bad_input(folders, record, capsys, monkeypatch):
    import lmshrink.api

    base, compressed = folders
    calls = []
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps the table's headers on a narrow terminal
    monkeypatch.setattr(lmshrink.api, "bench", lambda models, **kwargs: calls.append((models, kwargs)) or record)
    assert main(["bench", str(base), str(compressed), "--threads", "1", "--trials", "3", "--quiet"]) == 0
    assert calls[0][0] == [str(base), str(compressed)] and calls[0][1]["trials"] == 3
    out = capsys.readouterr().out
    assert "decode tok/s" in out and "packed" in out and "fast" in out
    assert calls[0][1]["decode"] == "both"
    assert main(["bench", str(base), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["models"][-1]["runtime"] == "packed"
    monkeypatch.undo()
    assert main(["bench", str(base), "--runtime", "packed", "--quiet"]) == 2
    assert "not a compressed checkpoint" in capsys.readouterr().err
    with pytest.raises(LmshrinkError, match="must be positive"):
        bench([str(base)], trials=0)
    with pytest.raises(LmshrinkError, match="decode='eager' is not known"):
        bench([str(base)], decode="eager")


def test_a_model_the_fast_path_refuses_keeps_its_hf_row(tmp_path):
    from tiny_families import tiny_model

    folder = tmp_path / "qwen3"
    tiny_model("qwen3").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    record = bench([str(folder)], prompt_tokens=8, new_tokens=2, trials=1, warmup=0, threads=1, progress=False)
    assert [row["decode"] for row in record["models"]] == ["hf"]
    assert "model_type 'qwen3'" in record["protocol"]["fast_skipped"][str(folder)]
    with pytest.raises(LmshrinkError, match="cannot decode with the fast path") as err:
        bench([str(folder)], prompt_tokens=8, new_tokens=2, trials=1, warmup=0, threads=1, progress=False,
              decode="fast")
    assert "--decode hf" in err.value.fix


# -- llama.cpp rows (--llama-cpp) ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_file(folders):
    from lmshrink.formats.gguf_export import export_gguf

    _, compressed = folders
    path = compressed.parent / "w4g32.gguf"
    export_gguf(compressed, path, dense_type="f32")
    return path


def test_gguf_size_counts_the_block_matrices_in_their_quantized_bytes(folders, gguf_file):
    from lmshrink.eval.bench import gguf_size

    model = tiny_llama(num_hidden_layers=2)
    linear = sum(linear_weight(module).numel() for _, module in iter_linears(model))
    size = gguf_size(str(gguf_file))
    assert size["linear_weights"] == linear
    # asymmetric 4-bit groups of 32 -> Q4_1 blocks: a float16 scale and min plus 16 bytes of codes per 32 weights
    assert size["linear_weight_bytes"] == linear * 20 // 32
    # embeddings (float32 here) and norms are counted in the totals only
    assert size["parameters"] == sum(p.numel() for p in model.parameters())
    assert size["weight_bytes"] > size["linear_weight_bytes"]


def test_llama_cpp_rows_are_refused_clearly_without_the_file_or_the_package(folders, gguf_file, monkeypatch, capsys):
    import importlib.util

    import lmshrink.api

    base, _ = folders
    with pytest.raises(LmshrinkError, match="no such file"):
        bench([str(base)], llama_cpp=[str(base / "missing.gguf")])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a))
    with pytest.raises(LmshrinkError, match="llama-cpp-python is not installed") as err:
        bench([str(base)], llama_cpp=[str(gguf_file)])
    assert "GGML_AMX_INT8=OFF" in err.value.fix
    monkeypatch.undo()
    with pytest.raises(LmshrinkError, match="no model to benchmark"):
        bench([], llama_cpp=[])
    calls = []
    monkeypatch.setattr(lmshrink.api, "bench", lambda models, **kwargs: calls.append((models, kwargs)) or {})
    main(["bench", str(base), "--llama-cpp", str(gguf_file), "--llama-cpp", "b.gguf", "--json"])
    assert calls[0][0] == [str(base)] and calls[0][1]["llama_cpp"] == [str(gguf_file), "b.gguf"]


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (optional extra llama-cpp; it compiles for about "
                           "10 minutes)")
def test_llama_cpp_row_runs_the_same_prompt_beside_the_packed_model(folders, gguf_file):
    base, compressed = folders
    record = bench([str(compressed)], llama_cpp=[str(gguf_file)], prompt_tokens=16, new_tokens=4, trials=2,
                   warmup=1, threads=1, progress=False, decode="hf")
    packed, cpp = record["models"]
    assert cpp["decode"] == "llama.cpp"
    assert packed["runtime"] == "packed" and cpp["runtime"] == "llama.cpp"
    assert cpp["model"]["kind"] == "gguf" and cpp["prompt_source"] == packed["prompt_source"]
    assert len(cpp["trials"]) == 2 and len(cpp["tokens"]) == 5
    for key in ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s"):
        assert cpp[key] > 0
    assert all(0 <= token < 300 for token in cpp["tokens"])
    assert cpp["linear_bytes_vs_fp16"] == pytest.approx(20 / 64)
    assert "llama-cpp-python" in record["protocol"]["llama_cpp"]
