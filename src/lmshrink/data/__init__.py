"""Text sources and token windows for calibration and evaluation."""

from .sources import DEFAULT_TEXT, TextSource, data_dir_from, known_sets, load_text
from .windows import Windows, calibration_windows, check_seqlen, evaluation_windows

__all__ = ["DEFAULT_TEXT", "TextSource", "data_dir_from", "known_sets", "load_text", "Windows",
           "calibration_windows", "check_seqlen", "evaluation_windows"]
