"""sd3train-train's documented exit statuses for the failures it expects (README, "Exit statuses")."""

from __future__ import annotations

import pytest
import torch

import sd3train.train as train_module
from sd3train.data.skips import DataBudgetError
from sd3train.lit.nonfinite import NonFiniteError
from sd3train.runtime.exit_codes import (
    CONFIG_EXIT_CODE,
    DATA_BUDGET_EXIT_CODE,
    NONFINITE_EXIT_CODE,
    OOM_EXIT_CODE,
)


@pytest.mark.parametrize(
    "error, status, message",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), OOM_EXIT_CODE,
         "out of memory on rank 3: CUDA out of memory. Tried to allocate 2.00 GiB"),
        (NonFiniteError("3 consecutive steps"), NONFINITE_EXIT_CODE, "3 consecutive steps"),
        (DataBudgetError("12 of 100 samples read"), DATA_BUDGET_EXIT_CODE, "12 of 100 samples read"),
    ],
)
def test_expected_failures_exit_with_their_status_and_say_why(monkeypatch, capsys, error, status, message):
    def failing_fit(cfg, extra_callbacks=()):  # the failure, as it reaches the entry point from inside training
        raise error

    monkeypatch.setattr(train_module, "fit", failing_fit)
    monkeypatch.setenv("RANK", "3")
    assert train_module.run_to_end(cfg=None)[0] == status
    err = capsys.readouterr().err
    assert message in err
    if status == OOM_EXIT_CODE:
        assert "No checkpoint was written for the failed step" in err and "(no CUDA device)" in err
    assert len({OOM_EXIT_CODE, NONFINITE_EXIT_CODE, DATA_BUDGET_EXIT_CODE,
                CONFIG_EXIT_CODE}) == 4
