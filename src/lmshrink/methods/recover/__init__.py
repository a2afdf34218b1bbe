"""Recovery after compression: distil the uncompressed model into LoRA adapters on the compressed one (the
``recover`` phase stage), merge them keeping pruned zeros and quantization grids."""
