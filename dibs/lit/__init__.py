"""Lightning glue: the EM module, the DataModule and the rollout callback."""
