"""Budget planning: the per-layer option space (``options``), the cheap cost proxy of each option on each layer
(``proxy``), and the exact allocator that picks one option per layer under a budget (``allocate``)."""
