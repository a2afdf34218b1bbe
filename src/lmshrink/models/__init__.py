"""Where models come from (packaged names, local folders, GGUF files, hub ids) and per-family adapters (which
modules are the blocks, the linears, the head). Import the submodules: ``loader``, ``adapters``, ``registry``."""
