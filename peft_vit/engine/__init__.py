"""Training engine: the loop (loop.py), processes (distributed.py), resumable state (checkpoint.py)."""
