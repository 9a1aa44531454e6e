"""Code the commands share, in rooms by stage: data, training, runs, inference, evaluation, crossval."""
