"""Activation and key/value-cache quantization: the stages that attach quantizers to a model's layers and
attention (``stages``), smoothing (SmoothQuant), reordering (RPTQ) and rotations (QuaRot) that make the
activations easier to quantize."""
