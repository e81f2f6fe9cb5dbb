"""Benchmarks: `python -m sd3train.bench.train_step` (our MM-DiT's training step against diffusers')."""
