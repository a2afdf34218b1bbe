"""Weight quantization methods: round-to-nearest and GPTQ/OPTQ."""

from lmshrink.methods.quant.gptq import GridRule, gptq_quantize
from lmshrink.methods.quant.rtn import rtn_quantize

__all__ = ["GridRule", "gptq_quantize", "rtn_quantize"]
