"""Structured pruning: attention heads, FFN channels and whole decoder blocks removed, leaving a smaller dense
model (``stages``: the recipe stages; ``width``, ``plan``, ``run``: the algorithms)."""
