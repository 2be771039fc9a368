"""ssd: see op.py for the public API and reference.py for the math."""
