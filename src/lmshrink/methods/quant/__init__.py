"""Weight quantization methods: round-to-nearest and GPTQ/OPTQ, with the refinements after the sweep."""
