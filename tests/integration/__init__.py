"""Integration tests: real models, real onnxruntime sessions, the real CLI."""
