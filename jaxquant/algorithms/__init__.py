"""Quantization algorithms: pure array math, separate from the model plumbing."""
