"""The package version (also ``lmshrink.__version__``)."""

__version__ = "0.1.0"
