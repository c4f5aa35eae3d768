import csv

from lightning.pytorch.loggers import CSVLogger

from lit_sftrl.run_logger import RunCSVLogger


def rows(path):
    return list(csv.DictReader(path.open()))


def log_twice(logger_class, folder):
    """A run logs steps 0-1, is killed, and a resumed run logs steps 2-3 (with a new column) into the same folder."""
    first = logger_class(save_dir=folder, name="", version="")
    first.log_metrics({"train/loss": 2.0}, step=0)
    first.log_metrics({"train/loss": 1.5}, step=1)
    first.save()
    resumed = logger_class(save_dir=folder, name="", version="")
    resumed.log_metrics({"train/loss": 1.0}, step=2)
    resumed.log_metrics({"train/loss": 0.5, "train/lr": 0.1}, step=3)
    resumed.save()
    return rows(folder / "metrics.csv")


def test_metrics_survive_a_resume_into_the_same_folder(tmp_path):
    kept = log_twice(RunCSVLogger, tmp_path / "ours")
    assert [row["step"] for row in kept] == ["0", "1", "2", "3"]
    assert [row["train/loss"] for row in kept] == ["2.0", "1.5", "1.0", "0.5"] and kept[-1]["train/lr"] == "0.1"
    # What it fixes: Lightning's own logger deletes the history on resume.
    assert [row["step"] for row in log_twice(CSVLogger, tmp_path / "lightning")] == ["2", "3"]
