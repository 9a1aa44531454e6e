"""crossval.py's rooms: its plan, one fold's work, the held-out scores, the looks and the adoption rule."""
