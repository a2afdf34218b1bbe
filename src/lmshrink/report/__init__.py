"""Reports: one self-contained HTML file of a results store (``html``)."""
