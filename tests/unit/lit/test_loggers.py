"""metrics.csv survives a resume: the second process appends instead of starting over."""

from __future__ import annotations

import csv

from sd3train.lit.loggers import RunCSVLogger, wandb_run_id


def read_rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_a_resumed_logger_appends_to_metrics_csv(tmp_path):
    first = RunCSVLogger(tmp_path)
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.log_metrics({"train/loss": 0.5}, step=10)
    first.save()

    resumed = RunCSVLogger(tmp_path)  # a new process after a requeue
    resumed.log_metrics({"train/loss": 0.25}, step=20)
    resumed.save()
    resumed.log_metrics({"train/loss": 0.2, "val/loss": 0.3}, step=30)  # a new column
    resumed.save()

    rows = read_rows(tmp_path / "metrics.csv")
    assert [row["step"] for row in rows] == ["0", "10", "20", "30"]
    assert [row["train/loss"] for row in rows] == ["1.0", "0.5", "0.25", "0.2"]
    assert rows[0]["val/loss"] == "" and rows[3]["val/loss"] == "0.3"


def test_wandb_id_is_a_function_of_the_run_directory(tmp_path):
    assert wandb_run_id(tmp_path / "a") == wandb_run_id(tmp_path / "a")
    assert wandb_run_id(tmp_path / "a") != wandb_run_id(tmp_path / "b")
