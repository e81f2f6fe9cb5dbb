"""Benchmarks: `python -m sd3train.bench.train_step` (our training step against diffusers'),
`python -m sd3train.bench.memory` (resident GPU memory per component), `python -m sd3train.bench.gpu`
(the one-GPU check), and the data, dedup and ZeRO-memory benchmarks beside them."""
