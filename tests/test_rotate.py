"""Rotations (QuaRot): Hadamard constructions, the rotate stage leaves the float model unchanged on every family it
supports (tied or untied embeddings) and refuses the others with the reason, saved folders rebuild their online
Hadamards (dense and packed), and rotated recipes resume and stream bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_resume_and_streaming_identical, save_tiny_llama, tiny_tokenizer, write_calibration_text
from tiny_families import tiny_model

from lmshrink import compress, load_model
from lmshrink.core.errors import LmshrinkError, UnsupportedArchitectureError
from lmshrink.core.hadamard import check_hadamard_size, hadamard_matrix, hadamard_transform, orthogonal_hadamard
from lmshrink.formats.runtime_scheme import RUNTIME_FILE
from lmshrink.models.loader import wrap_model
from lmshrink.runtime.activations import InputLinear
from lmshrink.runtime.qlinear import QuantLinear


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 64, 576, 1536])
def test_hadamard_matrices_are_orthogonal_and_the_fast_transform_equals_the_product(n):
    h = hadamard_matrix(n)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64))
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x), x @ orthogonal_hadamard(n), rtol=1e-12, atol=1e-12)
    q = orthogonal_hadamard(n, seed=3)
    torch.testing.assert_close(q @ q.t(), torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


def test_sizes_without_a_construction_are_refused():
    with pytest.raises(LmshrinkError, match="the hidden size is 92"):
        check_hadamard_size(92, "the hidden size")


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    return write_calibration_text(tmp_path_factory.mktemp("text") / "calib.txt")


def _logits(model, length=40):
    ids = torch.randint(0, 300, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [False, True])
def test_rotation_leaves_the_float_model_unchanged_and_reloads(family, tied, calib_file, tmp_path):
    model = tiny_model(family, tie_word_embeddings=tied)
    with torch.no_grad():  # loud norms, as in real models: folding them must be exact too
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 3.0)
    reference = _logits(model)
    compress(wrap_model(model, tiny_tokenizer()), [{"method": "rotate"}], output=tmp_path / "out",
             calibration=f"file:{calib_file}", nsamples=2, seqlen=32, progress=False)
    torch.testing.assert_close(_logits(model), reference, rtol=1e-4, atol=1e-4)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, tiny_model(family).model.layers[0]
                           .self_attn.q_proj.weight)
    assert torch.equal(model.model.layers[0].input_layernorm.weight, torch.ones(32))
    down = model.model.layers[1].mlp.down_proj
    assert isinstance(down, InputLinear) and down.input_transform.describe() == {"kind": "hadamard", "size": 64}
    reloaded = load_model(str(tmp_path / "out"), progress=False)
    torch.testing.assert_close(_logits(reloaded.model), reference, rtol=1e-4, atol=1e-4)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False


@pytest.mark.parametrize("family,reason", [("gpt2", "LayerNorm subtracts the mean"), ("opt", "LayerNorm"),
                                           ("gemma", r"\(1 \+ w\)"), ("phi3", "fused")])
def test_other_families_are_refused_with_the_reason(family, reason, calib_file):
    with pytest.raises(UnsupportedArchitectureError, match=f"rotate stage.*{family}.*{reason}"):
        compress(wrap_model(tiny_model(family), tiny_tokenizer()), [{"method": "rotate"}],
                 calibration=f"file:{calib_file}", nsamples=2, seqlen=32, progress=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-rot"), num_hidden_layers=2, hidden_size=64,
                           intermediate_size=128)


def test_rotated_w4_runs_packed_with_its_online_hadamards(tiny_dir, calib_file, tmp_path):
    model = load_model(str(tiny_dir), progress=False)
    reference = _logits(load_model(str(tiny_dir), progress=False).model)
    compress(model, [{"method": "rotate"}, {"method": "rtn", "bits": 8, "group_size": 32}], output=tmp_path / "out",
             calibration=f"file:{calib_file}", nsamples=2, seqlen=32, progress=False)
    ours = _logits(model.model)
    assert (ours - reference).abs().max() < 0.05 * reference.abs().max()
    scheme = json.loads((tmp_path / "out" / RUNTIME_FILE).read_text())
    assert sorted(scheme["inputs"]) == [f"model.layers.{b}.{n}" for b in (0, 1)
                                        for n in ("mlp.down_proj", "self_attn.o_proj")]
    packed = load_model(str(tmp_path / "out"), runtime="packed", progress=False)
    down = packed.model.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantLinear) and down.input_transform is not None
    torch.testing.assert_close(_logits(packed.model), ours, rtol=1e-3, atol=1e-3)


W4A4_KV4_ROT = [{"method": "rotate"}, {"method": "rtn", "bits": 4, "group_size": -1, "symmetric": True},
                {"method": "activations", "bits": 4, "clip_ratio": 0.9}, {"method": "kv-cache", "bits": 4,
                                                                          "group_size": 8, "window": 8, "rotate": True}]


def test_w4a4_kv4_rot_resumes_and_streams_bit_identically(tiny_dir, calib_file, tmp_path):
    def run(output, streamed=False, **kw):
        source = str(tiny_dir) if streamed else load_model(str(tiny_dir), progress=False)
        return compress(source, W4A4_KV4_ROT, output=output, calibration=f"file:{calib_file}", nsamples=4,
                        seqlen=32, progress=False, offload="disk" if streamed else "none", **kw)

    assert_resume_and_streaming_identical(tmp_path, run)
    assert torch.equal(_logits(load_model(str(tmp_path / "streamed"), progress=False).model),
                       _logits(load_model(str(tmp_path / "full"), progress=False).model))
