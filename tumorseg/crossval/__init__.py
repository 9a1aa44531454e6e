"""crossval.py's pieces: the plan, one fold's work, the held-out table, looks and the adoption rule."""
