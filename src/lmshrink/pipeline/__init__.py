"""The flow of a compression run above the engine: recipes and presets, checks, phases (engine passes and the
phase stages between them), and the compress verb."""
