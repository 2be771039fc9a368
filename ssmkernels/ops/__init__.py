"""One package per primitive: reference.py (the math), triton.py, cuda.py, op.py (public API)."""
