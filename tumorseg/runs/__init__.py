"""A run folder: its states, lock, records and checkpoints."""
