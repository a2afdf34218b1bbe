"""Streamed compression (offload="disk"): blocks read from safetensors one at a time give the same results and files
as the in-memory mode."""

import json

import pytest
import torch
from helpers import save_tiny_llama, write_calibration_text
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lmshrink import compress, load_model
from lmshrink.core.errors import LmshrinkError
from lmshrink.core.grids import dequantize
from lmshrink.engine.offload import materialised_blocks
from lmshrink.models.adapters import get_adapter

# clip search off keeps the tests fast; the streamed path is independent of the grid fitting
RECIPE = [{"method": "gptq", "bits": 4, "group_size": 32, "act_order": True, "static_groups": True,
           "clip_search": False}]
KINDS = ["single", "sharded", "tied"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}
    for kind in KINDS:
        made[kind] = save_tiny_llama(tmp_path_factory.mktemp(f"in-{kind}"), seed=3, num_hidden_layers=3,
                                     tie_word_embeddings=kind == "tied",
                                     save_kwargs={"max_shard_size": "50KB"} if kind == "sharded" else None)
    assert (made["sharded"] / "model.safetensors.index.json").is_file()
    return made


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return f"file:{write_calibration_text(tmp_path_factory.mktemp('text') / 'calib.txt')}"


@pytest.fixture(scope="module")
def in_memory(folders, calib, tmp_path_factory):
    """kind -> (record, output folder) of the in-memory compression, computed once per kind."""
    runs = {}

    def get(kind):
        if kind not in runs:
            out = tmp_path_factory.mktemp(f"mem-{kind}") / "out"
            runs[kind] = (_run(load_model(str(folders[kind]), progress=False), calib, out), out)
        return runs[kind]

    return get


def _run(model, calib, out, **kwargs):
    return compress(model, RECIPE, output=out, calibration=calib, nsamples=4, seqlen=48, progress=False, **kwargs)


def _same_results(a, b):
    assert a.keys() == b.keys() and len(a) == 3 * 7
    for name, r in a.items():
        o = b[name]
        assert torch.equal(r.codes, o.codes) and torch.equal(r.scale, o.scale) and torch.equal(r.zero, o.zero)
        assert (r.g_idx is None) == (o.g_idx is None) and (r.g_idx is None or torch.equal(r.g_idx, o.g_idx))
        assert r.spec == o.spec and r.rel_output_error == o.rel_output_error
        timeless = lambda info: {k: v for k, v in info.items() if k != "seconds"}  # noqa: E731
        assert timeless(r.info) == timeless(o.info)


def _files(folder):
    """Every output file but lmshrink.json: safetensors as (metadata, tensors) since their header's key order
    varies from write to write; others as bytes."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as handle:
                files[path.name] = (handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()})
        elif path.name != "lmshrink.json":
            files[path.name] = path.read_bytes()
    return files


def _same_files(a, b):
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys() and "model.safetensors" in fa
    for name, value in fa.items():
        if isinstance(value, tuple):
            assert value[0] == fb[name][0] and value[1].keys() == fb[name][1].keys()
            for key, tensor in value[1].items():
                other = fb[name][1][key]
                assert tensor.dtype == other.dtype and torch.equal(tensor, other), key
        else:
            assert value == fb[name], name


def test_lazy_model_has_real_embeddings_and_rotary_and_meta_blocks(folders):
    for kind in KINDS:
        full = load_model(str(folders[kind]), progress=False).model
        lazy = load_model(str(folders[kind]), progress=False, lazy_blocks=True)
        blocks = get_adapter(lazy.model).blocks(lazy.model)
        assert materialised_blocks(blocks) == []
        state = lazy.model.state_dict()
        for name, tensor in full.state_dict().items():
            if ".layers." not in name:
                assert torch.equal(state[name], tensor), name  # embeddings, norm, head, rotary inv_freq
        assert (lazy.model.lm_head.weight is lazy.model.model.embed_tokens.weight) == (kind == "tied")


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_compress_is_identical_and_holds_one_block(folders, calib, in_memory, tmp_path, kind):
    reference, reference_dir = in_memory(kind)
    lazy = load_model(str(folders[kind]), progress=False, lazy_blocks=True)
    blocks = get_adapter(lazy.model).blocks(lazy.model)
    seen = []  # blocks holding weights whenever a block runs
    for block in blocks:
        block.register_forward_pre_hook(lambda *_: seen.append(materialised_blocks(blocks)))
    streamed = _run(lazy, calib, tmp_path / "disk", offload="disk")
    assert seen and max(len(s) for s in seen) == 1
    assert {tuple(s) for s in seen} == {(0,), (1,), (2,)}
    assert materialised_blocks(blocks) == []  # every block released at the end
    _same_results(reference["results"], streamed["results"])
    for name, r in reference["results"].items():
        other = streamed["results"][name]
        assert torch.equal(dequantize(other.codes, other.scale, other.zero, other.group_index()), r.weight)
    _same_files(reference_dir, tmp_path / "disk")  # same tensors, metadata, config and tokenizer files
    assert json.loads((tmp_path / "disk" / "lmshrink.json").read_text())["summary"]["offload"] == "disk"


def test_streamed_output_loads_in_transformers_like_the_in_memory_output(folders, calib, in_memory, tmp_path):
    reference_dir = in_memory("tied")[1]
    _run(str(folders["tied"]), calib, tmp_path / "disk", offload="disk")  # a source string loads lazily
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(reference_dir).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "disk").eval()(ids).logits
    assert torch.equal(a, b)


class _Killed(Exception):
    pass


def test_streamed_resume_after_kill_is_bit_identical(folders, calib, in_memory, tmp_path):
    full, full_dir = in_memory("sharded")

    def kill_after_second_block(index):
        if index == 1:
            raise _Killed

    with pytest.raises(_Killed):
        _run(str(folders["sharded"]), calib, tmp_path / "out", offload="disk", on_block_done=kill_after_second_block)
    assert (tmp_path / "out.partial").is_dir() and not (tmp_path / "out").exists()
    resumed = _run(str(folders["sharded"]), calib, tmp_path / "out", offload="disk", resume=True)
    assert resumed["summary"]["resumed_from_block"] == 2
    _same_results(full["results"], resumed["results"])
    _same_files(full_dir, tmp_path / "out")


def test_offload_mismatches_fail_with_a_fix(folders, calib, tmp_path):
    with pytest.raises(LmshrinkError, match="already fully in memory"):
        _run(load_model(str(folders["single"]), progress=False), calib, tmp_path / "a", offload="disk")
    with pytest.raises(LmshrinkError, match="offload='disk'"):
        _run(load_model(str(folders["single"]), progress=False, lazy_blocks=True), calib, tmp_path / "b")
    with pytest.raises(LmshrinkError, match="not known"):
        _run(str(folders["single"]), calib, tmp_path / "c", offload="gpu")


def test_cli_offload_disk_writes_the_same_checkpoint(folders, calib, in_memory, tmp_path, capsys):
    from lmshrink.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages:\n" + "".join(
        "  - method: gptq\n    bits: 4\n    group_size: 32\n    act_order: true\n    static_groups: true\n"
        "    clip_search: false\n" for _ in RECIPE))
    code = main(["compress", str(folders["single"]), "--recipe", str(recipe), "--calib", calib, "--nsamples", "4",
                 "--seqlen", "48", "--offload", "disk", "-o", str(tmp_path / "cli"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "cli" / "lmshrink.json").read_text())["summary"]["offload"] == "disk"
    _same_files(in_memory("single")[1], tmp_path / "cli")


def test_truncated_or_missing_weights_are_model_source_errors(folders, tmp_path):
    import shutil

    from lmshrink.core.errors import ModelSourceError

    truncated = tmp_path / "truncated"
    shutil.copytree(folders["single"], truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 3])
    for lazy in (False, True):
        with pytest.raises(ModelSourceError, match="corrupt or incomplete"):
            load_model(str(truncated), progress=False, lazy_blocks=lazy)
    partial = tmp_path / "partial"
    shutil.copytree(folders["sharded"], partial)
    shard = sorted(partial.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelSourceError, match=f"{shard.name}, named by model.safetensors.index.json, is missing"):
        load_model(str(partial), progress=False, lazy_blocks=True)
    with pytest.raises(ModelSourceError):
        load_model(str(partial), progress=False)
