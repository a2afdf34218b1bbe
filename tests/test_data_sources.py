import json

import pytest
import torch
from helpers import tiny_tokenizer

from lmshrink.core.errors import DataSourceError, LmshrinkError
from lmshrink.data.sources import TextSource, load_text
from lmshrink.data.windows import calibration_windows, evaluation_windows


def test_wikitext_rows_rebuild_hf_layout(shared_data):
    src = load_text("wikitext2", "test", shared_data)
    assert len(src.documents) == 4358  # one row per line
    assert src.documents[0] == " " and src.documents[1] == " = Robert Boulter = "
    assert src.join == "\n\n"
    assert src.joined().startswith(" \n\n = Robert Boulter = \n\n \n\n Robert Boulter is")


def test_valid_alias_and_c4(shared_data):
    assert load_text("wikitext2", "validation", shared_data).split == "valid"
    c4 = load_text("c4", "train", shared_data)
    assert len(c4.documents) == 500 and c4.join == " "


def test_unknown_set_and_split(shared_data):
    with pytest.raises(DataSourceError, match="unknown text set 'nope'"):
        load_text("nope", "test", shared_data)
    with pytest.raises(DataSourceError, match="has no split 'dev'"):
        load_text("wikitext2", "dev", shared_data)


def test_missing_set_names_expected_path(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # no hub fallback
    with pytest.raises(DataSourceError) as err:
        load_text("wikitext2", "test", tmp_path)
    assert str(tmp_path / "wikitext-2-raw" / "wiki.test.raw") in err.value.message
    assert "--data-dir" in err.value.fix


def test_an_unreachable_or_offline_hub_is_asked_of_the_local_cache_only(tmp_path, monkeypatch):
    import socket
    import sys
    import types

    calls = []
    config = types.ModuleType("datasets.config")
    config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = False
    cached = {"wikitext": [" = Cached = ", " text "]}

    def load_dataset(path, *args, **kwargs):  # the real one retries an unreachable hub for ~25 s when online
        offline = config.HF_HUB_OFFLINE and config.HF_DATASETS_OFFLINE
        calls.append((path, offline))
        if offline and path in cached:
            return {"text": cached[path]}
        raise (FileNotFoundError("not in the cache") if offline else ConnectionError("Couldn't reach the Hub"))

    fake = types.ModuleType("datasets")
    fake.load_dataset, fake.config = load_dataset, config
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setitem(sys.modules, "datasets.config", config)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)

    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(DataSourceError, match="huggingface.co:443 cannot be reached.*cache does not hold it") as err:
        load_text("c4", "valid", tmp_path)  # not cached: fails at once, without asking the network
    assert str(tmp_path / "c4") in err.value.message and "--data-dir" in err.value.fix
    assert calls == [("allenai/c4", True)]
    assert load_text("wikitext2", "test", tmp_path).origin == "hf:wikitext/wikitext-2-raw-v1"  # cached: read
    assert config.HF_HUB_OFFLINE is False  # the switches are put back
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("asked the network while offline"))
    with pytest.raises(DataSourceError, match="HF_DATASETS_OFFLINE=1 is set"):
        load_text("ptb", "test", tmp_path)
    assert load_text("wikitext2", "test", tmp_path).documents == cached["wikitext"]
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # behind a proxy no direct probe: datasets asks the hub
    calls.clear()
    with pytest.raises(DataSourceError, match="could not provide it"):
        load_text("ptb", "test", tmp_path)
    assert calls == [("ptb_text_only", False)]


def test_missing_data_dir():
    with pytest.raises(DataSourceError, match="does not exist"):
        load_text("wikitext2", "test", "/nonexistent/data")


def test_file_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first para\nline two\n\nsecond para\n")
    assert load_text(f"file:{tmp_path / 'a.txt'}").documents == ["first para\nline two", "second para"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x y"}) + "\n\n" + json.dumps({"text": "z"}) + "\n")
    assert load_text(f"file:{tmp_path / 'b.jsonl'}").documents == ["x y", "z"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataSourceError, match="no 'text' field"):
        load_text(f"file:{tmp_path / 'c.jsonl'}")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"text": None}) + "\n")
    with pytest.raises(DataSourceError, match="d.jsonl:2: 'text' is NoneType"):
        load_text(f"file:{tmp_path / 'd.jsonl'}")
    with pytest.raises(DataSourceError, match="does not exist"):
        load_text(f"file:{tmp_path / 'missing.txt'}")


def _source(docs, join="\n\n"):
    return TextSource(name="t", split="s", documents=docs, join=join, origin="mem")


def test_evaluation_windows_are_the_joined_stream_cut_in_order():
    tok = tiny_tokenizer()
    src = _source(["The quick brown fox jumps over the lazy dog."] * 20)
    ids = tok(src.joined())["input_ids"]
    w = evaluation_windows(tok, src, seqlen=16)
    assert w.input_ids.shape == (len(ids) // 16, 16)
    assert w.input_ids.flatten().tolist() == ids[: len(w) * 16]
    assert w.protocol["windows_available"] == len(w)
    assert len(evaluation_windows(tok, src, seqlen=16, limit=3)) == 3
    with pytest.raises(LmshrinkError, match="larger than the"):
        evaluation_windows(tok, src, seqlen=16, limit=len(w) + 1)
    with pytest.raises(LmshrinkError, match="beyond the model's context of 8"):
        evaluation_windows(tok, src, seqlen=16, max_context=8)


def test_calibration_windows_follow_gptq_sampling():
    tok = tiny_tokenizer()
    docs = ["short", "The quick brown fox jumps over the lazy dog. " * 8, "Quantization rounds weights. " * 9]
    src = _source(docs)
    a = calibration_windows(tok, src, nsamples=6, seqlen=10, seed=3)
    b = calibration_windows(tok, src, nsamples=6, seqlen=10, seed=3)
    c = calibration_windows(tok, src, nsamples=6, seqlen=10, seed=4)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    assert a.input_ids.shape == (6, 10)
    encoded = [tok(d)["input_ids"] for d in docs]
    for row in a.input_ids.tolist():  # each window is a contiguous slice of one long-enough document
        assert any(len(e) > 10 and any(e[i:i + 10] == row for i in range(len(e) - 9)) for e in encoded)
    with pytest.raises(DataSourceError, match="longer than 500 tokens"):
        calibration_windows(tok, src, nsamples=1, seqlen=500)


def _bos_tokenizer():
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    shared = tiny_tokenizer()  # cached: changed only in a copy
    inner = Tokenizer.from_str(shared._tokenizer.to_str())
    bos = shared.convert_tokens_to_ids("<s>")
    inner.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return tok, bos


def test_stream_sets_calibrate_on_random_offsets_of_the_joined_text():
    tok = tiny_tokenizer()
    docs = [f"Paragraph {i} says that the quick brown fox jumps." for i in range(40)]  # each shorter than a window
    src = TextSource(name="paragraphs", split="all", documents=docs, join="\n\n", origin="test", calibration="stream")
    a = calibration_windows(tok, src, nsamples=5, seqlen=64, seed=1)
    assert torch.equal(a.input_ids, calibration_windows(tok, src, nsamples=5, seqlen=64, seed=1).input_ids)
    stream = tok(src.joined())["input_ids"]
    for row in a.input_ids.tolist():
        assert any(stream[i:i + 64] == row for i in range(len(stream) - 63))
    assert "joined" in a.protocol["sampling"] and a.protocol["bos_per_window"] is False
    with pytest.raises(DataSourceError, match="not more than one window"):
        calibration_windows(tok, src, nsamples=1, seqlen=len(stream))


def test_wikitext2_calibrates_with_windows_longer_than_its_paragraphs(shared_data):
    tok = tiny_tokenizer()
    src = load_text("wikitext2", "valid", shared_data)
    assert src.calibration == "stream" and load_text("c4", "train", shared_data).calibration == "documents"
    longest = max(len(tok(d)["input_ids"]) for d in src.documents)
    windows = calibration_windows(tok, src, nsamples=3, seqlen=longest + 100, seed=0)
    assert windows.input_ids.shape == (3, longest + 100)


def test_windows_start_with_bos_when_the_tokenizer_adds_it():
    tok, bos = _bos_tokenizer()
    src = _source(["The quick brown fox jumps over the lazy dog."] * 20)
    plain = tok(src.joined(), add_special_tokens=False)["input_ids"]
    w = evaluation_windows(tok, src, seqlen=16)
    assert w.protocol["bos_per_window"] is True
    assert w.input_ids[:, 0].eq(bos).all() and w.input_ids.shape[1] == 16
    assert w.input_ids[:, 1:].flatten().tolist() == plain[: len(w) * 15]
    old = evaluation_windows(tok, src, seqlen=16, bos_per_window=False)  # the GPTQ convention: BOS once
    assert old.protocol["bos_per_window"] is False and int(old.input_ids[0, 0]) == bos
    assert not old.input_ids[1:, 0].eq(bos).any()
    c = calibration_windows(tok, src, nsamples=3, seqlen=12, seed=0)
    assert c.input_ids[:, 0].eq(bos).all() and not c.input_ids[:, 1:].eq(bos).any()
    assert evaluation_windows(tiny_tokenizer(), src, seqlen=16).protocol["bos_per_window"] is False
