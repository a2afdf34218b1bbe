"""Compression methods: each solves one linear layer from the statistics the engine collected."""
