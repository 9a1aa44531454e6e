"""From a checkpoint to masks: prediction, the decision rule, output files, export formats."""
