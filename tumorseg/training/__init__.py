"""train.py's pieces: loaders, one step and one epoch, optimisation, the weight average, timing."""
