"""Inference backends, one module per engine; each is imported only when a bundle needs it."""
