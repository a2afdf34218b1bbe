"""Zero-shot task accuracy (PIQA, ARC, BoolQ, WinoGrande, LAMBADA, SST-2, ...) scored as lm-evaluation-harness
scores it: same prompts, same tokenization split, same acc / acc_norm / perplexity."""
