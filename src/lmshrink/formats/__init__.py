"""On-disk writers and readers of compressed models, and opening a model from any source (``loading``)."""
