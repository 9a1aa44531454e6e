"""The slices: reading, integrity checks, splits, caches, preprocessing, augmentation, sampling; volumes."""
