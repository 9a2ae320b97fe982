"""Matplotlib helpers the notebooks share, one module per topic (layout, scales, roofline, ...)."""
