"""Low-rank methods: truncated SVD (plain, ASVD, SVD-LLM), rank allocation, Basis Sharing and low-rank correction."""
