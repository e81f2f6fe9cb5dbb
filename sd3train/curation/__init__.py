"""Dataset curation: the precompute cache (`sd3train-precompute`)."""
