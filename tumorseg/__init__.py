"""tumorseg."""
