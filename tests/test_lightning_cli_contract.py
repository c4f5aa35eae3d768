"""What :class:`lit_sftrl.cli.trainer.SftRlCLI` relies on in LightningCLI (2.6), pinned on Lightning's own demo
model so that an upgrade that changes it fails here, naming the assumption, instead of deep inside a run:

* LightningCLI runs the CLI's ``fit`` / ``validate`` / ``test`` methods in place of the trainer's (SftRlCLI's hold
  the run directory's lock and read checkpoints with ``weights_only=True``);
* its private ``_parse_ckpt_path`` runs between parsing and ``before_instantiate_classes`` and merges the
  ``--ckpt_path`` file's ``hyper_parameters`` into the model's config (SftRlCLI overrides it: lit-sftrl's
  ``hyper_parameters`` are a record for exports, not the model's arguments).
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

TINY = ["--trainer.limit_val_batches", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu"]


class Stop(Exception):
    pass


def test_lightning_cli_runs_the_cli_s_subcommand_method_in_place_of_the_trainer_s(tmp_path):
    calls = []

    class RecordingCLI(LightningCLI):
        def validate(self, model, **kwargs):
            calls.append(sorted(kwargs))

    RecordingCLI(BoringModel, BoringDataModule, args=["validate", "--trainer.default_root_dir", str(tmp_path), *TINY])
    assert calls and "ckpt_path" in calls[0] and "weights_only" in calls[0]


def test_lightning_cli_merges_a_checkpoint_s_hyper_parameters_before_instantiating(tmp_path):
    checkpoint = tmp_path / "record.ckpt"
    torch.save({"hyper_parameters": {"backbone": {"path": "somewhere"}, "init_from": None}, "state_dict": {}},
               checkpoint)

    class StockCLI(LightningCLI):
        def before_instantiate_classes(self):
            raise Stop

    # lit-sftrl's record is not the model's arguments: the stock merge refuses it (or would rewrite the model)
    with pytest.raises(SystemExit):
        StockCLI(BoringModel, BoringDataModule, args=["validate", "--ckpt_path", str(checkpoint), *TINY])

    class OverriddenCLI(StockCLI):
        def _parse_ckpt_path(self):  # what SftRlCLI replaces, with its own checks
            pass

    with pytest.raises(Stop):  # without the merge, parsing reaches the public hooks
        OverriddenCLI(BoringModel, BoringDataModule, args=["validate", "--ckpt_path", str(checkpoint), *TINY])


def test_sft_rl_cli_overrides_no_other_private_lightning_method():
    from lit_sftrl.cli.trainer import SftRlCLI

    private = {name for name in vars(SftRlCLI) if name.startswith("_") and not name.startswith("__")
               and hasattr(LightningCLI, name)}
    assert private == {"_parse_ckpt_path"}
