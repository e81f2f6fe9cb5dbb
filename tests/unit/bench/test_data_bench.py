"""The data benchmark runs end to end on a handful of samples and reports every figure (no timing asserted)."""

from __future__ import annotations

import json

from sd3train.bench.data import main


def test_data_benchmark_reports_every_figure(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--samples", "6", "--per-shard", "3", "--workers", "1", "--batch", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["samples"] == 6 and result["workers"] == 1
    for name in ("image_per_core", "image_loader", "cached_per_core", "cached_loader"):
        assert result[name] > 0, name
    # A cached sample at 512^2 holds about 2.2 MB of bf16 tensors (latent moments, two captions' outputs).
    assert 2000 < result["cached_kb"] < 2400 and 50 < result["photo_kb"] < 400
