import csv

from lightning.pytorch.loggers import CSVLogger

from lit_sftrl.run.run_logger import RunCSVLogger


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


def test_a_full_disk_during_the_header_rewrite_keeps_the_history(tmp_path, monkeypatch):
    """A new column makes the logger rewrite metrics.csv; a write that fails half-way (ENOSPC) must leave the
    file as it was, not truncated."""
    import errno

    import pytest

    logger = RunCSVLogger(save_dir=tmp_path, name="", version="")
    logger.log_metrics({"train/loss": 2.0}, step=0)
    logger.save()
    before = (tmp_path / "metrics.csv").read_text()
    original = csv.DictWriter.writerows

    def disk_full(self, rows_):
        original(self, list(rows_)[:0])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerows", disk_full)
    logger.log_metrics({"train/loss": 1.0, "train/lr": 0.1}, step=1)
    with pytest.raises(OSError, match="No space"):
        logger.save()
    assert (tmp_path / "metrics.csv").read_text() == before
    assert not list(tmp_path.glob("*.tmp"))
