"""Text sources and token windows for calibration and evaluation (``sources``, ``windows``)."""
