"""The memory model of the README's sharding note: exact parameter counts and the ZeRO accounting."""

from __future__ import annotations

import pytest

from sd3train.bench.zero_memory import main, parameter_count, table


def test_parameter_counts_are_the_released_model_sizes():
    assert parameter_count("sd3_medium") == pytest.approx(2.03e9, rel=0.01)
    assert parameter_count("sd35_large") == pytest.approx(8.06e9, rel=0.01)


def test_zero_stages_divide_the_sixteen_bytes_per_parameter_as_the_zero_paper_does():
    result = table("sd35_large", gpus=8)
    parameters = result["parameters"]
    states = {name: gb * 1e9 / parameters for name, gb in result["states_gb"].items()}
    assert states == pytest.approx({"ddp": 16.0, "zero1": 4 + 12 / 8, "zero2": 2 + 14 / 8, "zero3": 2.0,
                                    "fsdp": 2.0, "fsdp_keep": 2 + 2.0})
    # The figure: an 8B MM-DiT needs about 129 GB of training state without sharding.
    assert result["states_gb"]["ddp"] == pytest.approx(129, abs=1)
    assert result["traffic_gb_per_step"]["zero3"] == pytest.approx(1.5 * result["traffic_gb_per_step"]["ddp"])
    # FSDP2's fp32 reduce-scatter is a whole bf16 all-reduce's volume, plus two bf16 all-gathers.
    assert result["traffic_gb_per_step"]["fsdp"] == pytest.approx(2.0 * result["traffic_gb_per_step"]["ddp"])


def test_cli_prints_both_models(capsys):
    assert main(["--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "sd3_medium: 2.028B" in out and "sd35_large: 8.057B" in out and "does not fit" in out
