"""The dedup benchmark runs end to end at tiny sizes and reports every figure (no timing asserted)."""

from __future__ import annotations

import json

import numpy as np

from sd3train.bench.dedup import COPY_SIMILARITY, main, synthetic_descriptors


def test_dedup_benchmark_reports_every_figure(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--images", "2", "--batch-size", "2", "--threads", "1",
                 "--descriptors", "2000", "--clusters", "20", "--model-batches", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads((tmp_path / "dedup_bench.json").read_text()) == result
    for name in ("thumbnail_per_s", "sscd_cpu_per_s", "sscd_cpu_model_per_s"):
        assert result[name] > 0, name
    search = result["search"]
    assert search["descriptors"] == 2000 and search["clusters"] == 20 and search["planted"] == 40
    assert search["planted_recall"] >= 0.9 and search["cluster_search_total_s"] > 0


def test_synthetic_descriptors_are_unit_with_planted_copies():
    descriptors, planted = synthetic_descriptors(3000, seed=1)
    assert descriptors.shape == (3000, 512) and planted.shape == (60, 2)
    np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, rtol=1e-5)
    copies = np.einsum("pd,pd->p", descriptors[planted[:, 0]], descriptors[planted[:, 1]])
    assert abs(float(np.median(copies)) - COPY_SIMILARITY) < 0.02
    others = descriptors[:200] @ descriptors[200:400].T
    assert float(np.percentile(others, 99.9)) < 0.5  # distinct descriptors stay under the threshold
