"""lmshrink: compress language models after training, and measure what it did."""

__version__ = "0.1.0"
