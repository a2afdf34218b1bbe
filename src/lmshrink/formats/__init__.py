"""On-disk writers and readers of compressed models."""

from lmshrink.formats.atomic import atomic_directory, atomic_write_bytes, atomic_write_text, check_output_dir
from lmshrink.formats.compressed_tensors import is_compressed_tensors_folder, load_quantized_results, save_quantized
from lmshrink.formats.sparse_bitmask import load_sparse_results

__all__ = ["atomic_directory", "atomic_write_bytes", "atomic_write_text", "check_output_dir",
           "is_compressed_tensors_folder", "load_quantized_results", "load_sparse_results", "save_quantized"]
