"""lmshrink: compress language models after training, and measure what it did."""

__version__ = "0.1.0"

from .api import bench, compress, evaluate, export, load_model  # noqa: E402

__all__ = ["__version__", "bench", "compress", "evaluate", "export", "load_model"]
