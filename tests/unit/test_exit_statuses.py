"""sd3train-train's documented exit statuses for the failures it expects (README, "Exit statuses")."""

from __future__ import annotations

import pytest
import torch

import sd3train.train as train_module
from sd3train.data.skips import DataBudgetError
from sd3train.lit.nonfinite import NONFINITE_EXIT_CODE, NonFiniteError


@pytest.mark.parametrize(
    "error, status, message",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), train_module.OOM_EXIT_CODE,
         "out of memory on rank 3: CUDA out of memory. Tried to allocate 2.00 GiB"),
        (NonFiniteError("3 consecutive steps"), NONFINITE_EXIT_CODE, "3 consecutive steps"),
        (DataBudgetError("12 of 100 samples read"), train_module.DATA_BUDGET_EXIT_CODE, "12 of 100 samples read"),
    ],
)
def test_expected_failures_exit_with_their_status_and_say_why(monkeypatch, capsys, error, status, message):
    def failing_fit(cfg):  # the failure, as it reaches the entry point from inside training
        raise error

    monkeypatch.setattr(train_module, "fit", failing_fit)
    monkeypatch.setenv("RANK", "3")
    assert train_module.run_guarded(cfg=None) == status
    err = capsys.readouterr().err
    assert message in err
    if status == train_module.OOM_EXIT_CODE:
        assert "No checkpoint was written for the failed step" in err and "(no CUDA device)" in err
    assert len({train_module.OOM_EXIT_CODE, NONFINITE_EXIT_CODE, train_module.DATA_BUDGET_EXIT_CODE,
                train_module.CONFIG_EXIT_CODE}) == 4
