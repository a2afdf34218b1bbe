"""Pruning methods: magnitude, Wanda, SparseGPT (unstructured and N:M, optionally joint with quantization), the
OWL layer-wise sparsity allocation, and the least-squares refit of the kept weights for a chosen mask."""
