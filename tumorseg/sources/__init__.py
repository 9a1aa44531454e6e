"""prepare_data.py's sources: the synthetic demo, the figshare release, NIfTI volume pairs."""
