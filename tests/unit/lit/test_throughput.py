"""StepThroughput: the logged step time, TFLOP/s and MFU against a fake clock, from shapes alone;
and a real CPU fit that writes them to metrics.csv.

Batches are meta tensors: they have shapes and no values, so a callback that read a value (a
host-device synchronisation on a GPU) would fail here.
"""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch

from sd3train.config.schema import ModelConfig
from sd3train.config.typed import ConfigError
from sd3train.lit.throughput import StepThroughput
from sd3train.model.flops import training_step_flops
from sd3train.paths import run_dir_of
from sd3train.train import fit
from tests.support.config import compose_config, tiny_config

MODEL = ModelConfig(depth=2, hidden_size=64, num_heads=2, in_channels=4, context_dim=32, pooled_dim=16,
                    pos_embed_max_size=16, sample_size=16)
TEXT_TOKENS = 10
DOWNSAMPLE = 8


class FakeClock:
    """Returns the given times in order, one per call."""

    def __init__(self, *times: float):
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


class FakeModule:
    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)
        self.logged: list[tuple[int, dict, int]] = []
        self.trainer = None

    def log_dict(self, metrics: dict, batch_size: int) -> None:
        self.logged.append((self.trainer.global_step, metrics, batch_size))


def images(batch: int, height: int, width: int) -> dict:
    return {"images": torch.empty(batch, 3, height, width, device="meta"), "keys": ["k"] * batch}


def cached(batch: int, latent_h: int, latent_w: int) -> dict:
    return {"latent_mean": torch.empty(batch, 4, latent_h, latent_w, device="meta"),
            "latent_std": torch.empty(batch, 4, latent_h, latent_w, device="meta"), "keys": ["k"] * batch}


def flops(batch: int, latent_h: int, latent_w: int) -> int:
    return training_step_flops(MODEL, batch, latent_h, latent_w, TEXT_TOKENS)


def run_steps(callback: StepThroughput, module: FakeModule, trainer, steps: list[list[dict]],
              validation_after: set[int] = frozenset()) -> None:
    """Call the hooks as Lightning does: each step's micro-batches, global_step counting the step
    only from its last micro-batch on, validation after the steps named."""
    callback.on_train_start(trainer, module)
    batch_idx = 0
    for micro_batches in steps:
        for index, batch in enumerate(micro_batches):
            if index == len(micro_batches) - 1:
                trainer.global_step += 1
            callback.on_train_batch_end(trainer, module, None, batch, batch_idx)
            batch_idx += 1
        if trainer.global_step in validation_after:
            callback.on_validation_start(trainer, module)
            callback.on_validation_end(trainer, module)


def fake_trainer(accumulate: int = 1, precision: str = "32-true") -> SimpleNamespace:
    return SimpleNamespace(global_step=0, accumulate_grad_batches=accumulate, precision=precision)


def test_logging_steps_log_time_tflops_and_mfu_of_their_window_summed_over_micro_batches():
    # start 10.0; step 2 logs at 10.5; validation after step 3 from 11.0 to 14.0; step 4 logs at 15.0.
    clock = FakeClock(10.0, 10.5, 11.0, 14.0, 15.0)
    callback = StepThroughput(MODEL, TEXT_TOKENS, DOWNSAMPLE, log_every_n_steps=2, peak_tflops=0.25, clock=clock)
    trainer, module = fake_trainer(accumulate=2), FakeModule()
    module.trainer = trainer
    steps = [
        [images(4, 64, 64), images(4, 64, 64)],  # 8x8 latents
        [cached(4, 6, 10), images(2, 48, 80)],  # a 6x10 bucket, cached, then online
        [cached(3, 8, 8), cached(3, 8, 8)],
        [images(1, 64, 64), images(1, 64, 64)],
    ]
    run_steps(callback, module, trainer, steps, validation_after={3})

    assert [(step, size) for step, _, size in module.logged] == [(2, 2), (4, 1)]
    first_flops = 2 * flops(4, 8, 8) + flops(4, 6, 10) + flops(2, 6, 10)
    second_flops = 2 * flops(3, 8, 8) + 2 * flops(1, 8, 8)
    for (_, metrics, _), seconds, window_flops in ((module.logged[0], 0.5, first_flops),
                                                   (module.logged[1], 1.5, second_flops)):
        tflops_per_sec = window_flops / seconds / 1e12
        assert metrics == {"train/step_time_ms": 1e3 * seconds / 2, "train/tflops_per_sec": tflops_per_sec,
                           "train/mfu": tflops_per_sec / 0.25}
    assert module.logged[0][1]["train/step_time_ms"] == 250.0 and module.logged[1][1]["train/step_time_ms"] == 750.0
    assert clock.times == []  # the clock is read at the start, at logging steps and around validation only


def test_without_a_known_peak_mfu_is_left_out():
    callback = StepThroughput(MODEL, TEXT_TOKENS, DOWNSAMPLE, log_every_n_steps=1, clock=FakeClock(0.0, 2.0))
    trainer, module = fake_trainer(), FakeModule()
    module.trainer = trainer
    run_steps(callback, module, trainer, [[images(2, 64, 64)]])
    assert module.logged == [(1, {"train/step_time_ms": 2000.0,
                                  "train/tflops_per_sec": flops(2, 8, 8) / 2.0 / 1e12}, 2)]


def test_on_a_gpu_the_peak_is_the_devices_dense_figure_at_the_training_precision(monkeypatch):
    synchronised = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synchronised.append(device))
    callback = StepThroughput(MODEL, TEXT_TOKENS, DOWNSAMPLE, log_every_n_steps=3, clock=FakeClock(0.0, 1.0))
    trainer, module = fake_trainer(precision="bf16-mixed"), FakeModule("cuda")
    module.trainer = trainer
    run_steps(callback, module, trainer, [[images(2, 64, 64)]] * 3)
    assert callback.peak == 989.4
    assert module.logged[0][1]["train/mfu"] == 3 * flops(2, 8, 8) / 1.0 / 1e12 / 989.4
    # Once when training starts and once at the logging step: never on the ordinary steps 1 and 2.
    assert len(synchronised) == 2


def test_a_configured_peak_wins_over_the_table(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    callback = StepThroughput(MODEL, TEXT_TOKENS, DOWNSAMPLE, log_every_n_steps=1, peak_tflops=500.0)
    callback.on_train_start(fake_trainer(precision="bf16-mixed"), FakeModule("cuda"))
    assert callback.peak == 500.0


def test_from_config_reads_text_lengths_vae_downsampling_and_the_peak():
    cfg = compose_config("experiment=tiny_cpu", "trainer.peak_tflops=2.5", "trainer.log_every_n_steps=7")
    callback = StepThroughput.from_config(cfg)
    assert callback.text_tokens == cfg.text.clip_l.max_length + cfg.text.t5.max_length
    assert callback.vae_downsample == 2 ** (len(cfg.vae.block_out_channels) - 1)
    assert (callback.peak, callback.every_n_steps, callback.model) == (2.5, 7, cfg.model)


@pytest.mark.parametrize("value", ["0", "-1.5"])
def test_a_peak_that_is_not_positive_is_refused_at_compose_time(value):
    with pytest.raises(ConfigError, match=rf"trainer.peak_tflops: must be > 0 .*got {value}"):
        compose_config("experiment=tiny_cpu", f"trainer.peak_tflops={value}")


def test_a_real_fit_writes_throughput_and_mfu_to_metrics_csv_at_logging_steps_only(small_shapes, tmp_path):
    peak = 0.01  # TFLOP/s
    cfg = tiny_config(
        small_shapes, tmp_path, "model.depth=1", "data.resolution=32", "data.batch_size=2",
        "data.cache_latents=false", "data.val_shards=null", "eval.prompts=[]", "eval.samples_per_caption=0",
        "logger.wandb=false", "trainer.progress_bar=false", "trainer.max_steps=4", "trainer.log_every_n_steps=2",
        f"trainer.peak_tflops={peak}",
    )
    fit(cfg)
    with open(run_dir_of(cfg) / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # Lightning writes step k - 1 for the k-th optimizer step.
    logged = {int(row["step"]) + 1: row for row in rows if row.get("train/mfu")}
    assert sorted(logged) == [2, 4]
    for row in logged.values():
        step_ms, tflops, mfu = (float(row[key]) for key in ("train/step_time_ms", "train/tflops_per_sec", "train/mfu"))
        assert step_ms > 0 and tflops > 0
        assert mfu == pytest.approx(tflops / peak, rel=1e-5)
    assert all(not row.get("train/tflops_per_sec") for row in rows if int(row["step"]) + 1 not in logged)
