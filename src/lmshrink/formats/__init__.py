"""On-disk writers and readers of compressed models."""

from lmshrink.formats.atomic import atomic_directory, atomic_write_bytes, atomic_write_text, check_output_dir
from lmshrink.formats.compressed_tensors import is_compressed_tensors_folder, load_quantized_results, save_quantized

__all__ = ["atomic_directory", "atomic_write_bytes", "atomic_write_text", "check_output_dir",
           "is_compressed_tensors_folder", "load_quantized_results", "save_quantized"]
