"""The GPU check's plan, budget and outputs, with a fake runner (no GPU here); without CUDA it exits 2."""

from __future__ import annotations

import json

import pytest
import torch

from sd3train.bench import gpu, train_step


class FakeRunner:
    """train_step.run for each call, made up: 100 ms/step for diffusers, 80 for ours; `seconds` each."""

    def __init__(self, clock: list[float], seconds: float, fail: str = ""):
        self.clock, self.seconds, self.fail = clock, seconds, fail
        self.calls: list[list[str]] = []

    def __call__(self, arguments: list[str]) -> dict:
        self.calls.append(arguments)
        self.clock[0] += self.seconds
        variant = arguments[arguments.index("--variants") + 1]
        if variant == self.fail:
            raise RuntimeError("CUDA out of memory")
        median = 100.0 if variant == "diffusers" else 80.0
        row = {"median_ms": median, "min_ms": median, "samples_per_s": 8 / median * 1e3, "achieved_tflops": 300.0,
               "mfu": 0.3, "peak_memory_bytes": 40e9, "peak_memory_kind": "torch.cuda.max_memory_allocated"}
        return {"device": "NVIDIA H100 80GB HBM3", "torch_version": "2.14.1", "training_flops_per_step": 1,
                "variants": {variant: row}}


def test_without_cuda_it_exits_2_and_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--out", str(tmp_path / "out")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_plan_is_depth_24_at_512_in_bf16_batch_8_and_16_with_and_without_compile():
    runs = {(name, batch, tuple(extra)) for name, batch, extra, _ in gpu.RUNS}
    assert {(batch, "--compile" in extra, "selective" in extra) for _, batch, extra in runs} == {
        (8, False, False), (8, True, False), (16, False, True), (16, True, True)}
    for _, batch, extra, variants in gpu.RUNS:
        arguments = [*gpu.COMMON, "--batch", str(batch), *extra]
        assert arguments[arguments.index("--model") + 1] == "sd3_medium"
        assert arguments[arguments.index("--resolution") + 1] == "512"
        assert arguments[arguments.index("--dtype") + 1] == "bf16"
        assert set(variants) <= {"diffusers", "bare", "step"} and "step" in variants
    assert train_step.model_config(train_step.parse_args(["--model", "sd3_medium"])).depth == 24


def test_every_variant_runs_once_and_the_outputs_hold_a_row_each(tmp_path):
    clock = [0.0]
    runner = FakeRunner(clock, seconds=10.0)
    results = gpu.measure(tmp_path, budget_s=290.0, runner=runner, clock=lambda: clock[0])
    expected = [(name, variant) for name, _, _, variants in gpu.RUNS for variant in variants]
    assert [(row["run"], row["variant"]) for row in results["rows"]] == expected
    assert len(runner.calls) == len(expected)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    table = (tmp_path / "table.md").read_text()
    assert "NVIDIA H100 80GB HBM3" in table
    # ours 80 ms against diffusers' 100 ms of the same batch, compiled rows too
    assert table.count("| 1.25 |") == len(expected) - 2 and table.count("| 1.00 |") == 2


def test_variants_past_the_budget_are_skipped_and_a_failure_is_recorded(tmp_path):
    clock = [0.0]
    runner = FakeRunner(clock, seconds=60.0, fail="bare")
    results = gpu.measure(tmp_path, budget_s=200.0, runner=runner, clock=lambda: clock[0])
    rows = results["rows"]
    # 60 s each: runs at 0, 60, 120 s; at 180 s only 20 s are left, then fewer than 20.
    assert len(runner.calls) == 4
    assert rows[1]["error"] == "RuntimeError: CUDA out of memory"
    assert all("time budget" in row["skipped"] for row in rows[4:])
    assert "CUDA out of memory" in (tmp_path / "table.md").read_text()
    assert runner.calls[3][-1] == "20"  # each variant may use what is left


@pytest.mark.parametrize("name", ["table.md", "results.json"])
def test_outputs_are_written_after_each_variant(tmp_path, name):
    clock = [0.0]
    seen = []

    def runner(arguments):
        seen.append((tmp_path / name).exists())
        return FakeRunner(clock, 1.0)(arguments)

    gpu.measure(tmp_path, budget_s=290.0, runner=runner, clock=lambda: clock[0])
    assert seen[0] is False and all(seen[1:])
