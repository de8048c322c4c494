"""Operators that need a CPU fallback (the CUDA extension is optional)."""
