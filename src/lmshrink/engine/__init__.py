"""The block-by-block engine: statistics passes, the loop over decoder blocks, resume and disk streaming."""
