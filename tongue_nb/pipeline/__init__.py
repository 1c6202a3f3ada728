"""Pipeline: the notebook sweep and its executors, the cost screen, prediction on new photos, the command line."""
