"""Core types every layer shares: errors, quantization grids and packing, layer results, the stage protocol and
its registry, atomic writes, process statistics, packaged-file fetching."""
