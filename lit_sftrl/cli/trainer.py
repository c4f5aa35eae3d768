"""LightningCLI for lit-sftrl: YAML in, a checked config, then a model. Nothing is built from a bad config."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_sftrl.core import validation
from lit_sftrl.core.disk import DiskFull
from lit_sftrl.data.datamodules import EpisodeDataModule
from lit_sftrl.data.tasks import TaskConfig
from lit_sftrl.models.export import check_lightning_checkpoint, read_lightning_checkpoint
from lit_sftrl.models.loading import check_model_directory, is_gguf
from lit_sftrl.models.tiny import TINY_NAME
from lit_sftrl.run.checkpoint_io import AtomicCheckpointIO
from lit_sftrl.run.cli_errors import ShortErrorParser
from lit_sftrl.run.progress import use_run_callbacks
from lit_sftrl.run.quiet import quiet_console
from lit_sftrl.run.run_dir import (
    RunConfigCallback,
    RunDirectoryBusy,
    RunDirectoryLock,
    clear_run_directory,
    place_in_run_directory,
    previous_run_files,
    remove_orphan_temporaries,
)
from lit_sftrl.training.policy import PolicyModule
from lit_sftrl.training.ppo import PPOConfig

CKPT_PATH_KEYWORDS = ("last", "best", "hpc", "registry")  # what Lightning resolves to a file itself
validation.install_yaml_limits()  # every config this CLI reads goes through the size and alias limits


class SftRlCLI(LightningCLI):
    """``model`` is an SFTModule or PPOModule, ``data`` an SFTDataModule or RLDataModule (``class_path`` in YAML)."""

    def __init__(self, args: list[str] | None = None) -> None:
        # From the shell, errors the user can fix end in one line; in-process callers (tests) get the exception.
        self._command_line = args is None
        quiet_console()
        super().__init__(
            PolicyModule,
            EpisodeDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=RunConfigCallback,
            parser_class=ShortErrorParser,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={"default_env": False},
            args=args,
        )

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The trainer, its plain checkpoint writer replaced by :class:`AtomicCheckpointIO`. Set here, not as a
        ``trainer.plugins`` default: an instance there cannot be serialised, so every saved and printed config read
        ``Unable to serialize instance`` and could not be fed back (``fit --config <run>/config.yaml``).
        Strategies with their own writer (DeepSpeed, sharded FSDP) and a user's own plugin are left alone."""
        trainer = super().instantiate_trainer(**kwargs)
        use_run_callbacks(trainer)  # progress per rollout and evaluation; no `Total FLOPs: 0`
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        for callback in trainer.checkpoint_callbacks:  # whatever the logger, checkpoints live in the run directory
            if getattr(callback, "dirpath", "") is None and self._get(self.config, "trainer.default_root_dir"):
                callback.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        return trainer

    def parse_arguments(self, parser: Any, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except RecursionError:  # jsonargparse follows `config:` keys without a cycle check
            sys.exit("lit-sftrl: a config file includes itself (directly or through another one); nothing was run")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        problems = config_problems(config)
        if problems:
            lines = "\n".join(f"  {key}: {message}" for key, message in problems)
            sys.exit(f"lit-sftrl {self.subcommand}: the config has problems, nothing was run:\n{lines}")
        unreadable = checkpoint_problems(config)
        if unreadable:
            lines = "\n".join(f"  {key}: {message}" for key, message in unreadable)
            sys.exit(f"lit-sftrl {self.subcommand}: a checkpoint cannot be read, nothing was run:\n{lines}")
        config.trainer.strategy = ddp_strategy(config.trainer.get("strategy"))
        place_in_run_directory(config.trainer)

    def _parse_ckpt_path(self) -> None:
        """Check an explicit ``--ckpt_path`` file; do not merge its hyper-parameters into the config.

        LightningCLI (2.6) loads that file right after parsing, before before_instantiate_classes, so a damaged
        one must be refused here or torch's traceback comes first. It would then merge the checkpoint's
        hyper-parameters into ``model``: ours are a record (``backbone``, ``init_from``) without a class path, so
        the merge turned the model into the base PolicyModule ("No `training_step()` method defined") and would
        override the config's backbone with the stored one. The config is the source of truth here; the weights,
        optimizer, schedule and data position come from the checkpoint when the trainer restores it.
        """
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and path not in CKPT_PATH_KEYWORDS and Path(path).is_file():
            try:
                check_lightning_checkpoint(path)
            except (FileNotFoundError, ValueError) as error:
                sys.exit(f"lit-sftrl {subcommand}: a checkpoint cannot be read, nothing was run:\n  ckpt_path: {error}")
            mismatch = run_kind_mismatch(path, str(self.config[subcommand].model.get("class_path") or ""))
            if mismatch:
                sys.exit(f"lit-sftrl {subcommand}: {mismatch}; nothing was run")

    def _run_subcommand(self, subcommand: str) -> None:
        """Run the subcommand holding the run directory's lock (one writer at a time), its orphan temporary
        checkpoints of a killed run removed first. Only global rank 0 locks: the other ranks are the same run."""
        lock = None
        if self.trainer.global_rank == 0:
            run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            lock = RunDirectoryLock(run_dir)
            try:
                lock.acquire(f"lit-sftrl {subcommand}")
            except RunDirectoryBusy as error:
                sys.exit(f"lit-sftrl {subcommand}: {error}; nothing was run")
        try:
            if lock is not None:
                remove_orphan_temporaries(lock.run_dir)
                if subcommand == "fit":
                    self._refuse_a_previous_run(lock.run_dir)
            super()._run_subcommand(subcommand)
        finally:
            if lock is not None:
                lock.release()

    def _refuse_a_previous_run(self, run_dir: Path) -> None:
        """A fit into a directory holding another run mixed the two (``last-v1.ckpt`` beside ``last.ckpt``,
        evaluation records and config.yaml overwritten): refused unless resuming it or asked to overwrite it."""
        previous = previous_run_files(run_dir)
        if not previous or self._get(self.config, "ckpt_path"):
            return
        if self._get(self.config, "overwrite"):
            clear_run_directory(run_dir)
            return
        sys.exit(f"lit-sftrl fit: run directory {str(run_dir)!r} already holds a run ({', '.join(previous[:4])}): "
                 "resume it with --ckpt_path last, choose another --trainer.default_root_dir, or replace it with "
                 "--overwrite true; nothing was run")

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # predict is Lightning's, not ours: the modules play episodes in validate/test (save_transcripts).
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    def log_whole_config(self) -> None:
        """The whole parsed config reaches every logger as hyperparameters (runs compare by lr, task, PPO
        settings...), not only the module's own record."""
        config = self.config[self.subcommand].clone()
        config.pop("trainer.callbacks", None)
        flat = {key.replace(".init_args.", ".").replace("init_args.", ""): value
                for key, value in _flatten(config.as_dict())}
        for logger in self.trainer.loggers:
            logger.log_hyperparams(flat)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit into a run directory that holds another run: delete that run's files first")

    # LightningCLI calls before_<subcommand> once the trainer exists: only then does "--ckpt_path last" name a file.
    def before_fit(self) -> None:
        self._check_last_checkpoint()
        self.log_whole_config()

    def before_validate(self) -> None:
        self._check_last_checkpoint()

    before_test = before_validate

    def _check_last_checkpoint(self) -> None:
        if self._get(self.config, "ckpt_path") != "last":
            return
        path = last_checkpoint(self.trainer)
        if path is None:  # Lightning warns and starts from scratch
            return
        try:
            check_lightning_checkpoint(path)
        except (FileNotFoundError, ValueError) as error:
            sys.exit(f"lit-sftrl {self.subcommand}: --ckpt_path last: {error}; nothing was run. "
                     "Resume from another checkpoint with --ckpt_path PATH.")

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        # Checkpoints are read with weights_only=True only (a pickle naming other code would run it); the
        # option is checked in config_problems, so this pins what the trainer's own restore does.
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in kwargs:
            kwargs["weights_only"] = True
        return kwargs

    def fit(self, model: Any, **kwargs: Any) -> None:
        """``trainer.fit`` (LightningCLI runs this method in its place): a run that repeated non-finite losses
        stopped ends, from the shell, with its message (which names the checkpoint it saved), not a traceback."""
        try:
            self.trainer.fit(model, **kwargs)
        except (FloatingPointError, validation.LimitExceeded, DiskFull) as error:
            if not self._command_line:
                raise
            sys.exit(f"lit-sftrl fit: {error}")


def checkpoint_problems(config: Any) -> list[tuple[str, str]]:
    """Checkpoint files and model directories the config names that do not read back whole (truncated,
    corrupted, not lit-sftrl's): refused here, naming the file, instead of failing deep inside Lightning, torch or
    transformers after the model is built."""
    model = config.model.init_args if "init_args" in config.model else config.model
    problems = []
    named = (("ckpt_path", config.get("ckpt_path")), ("model.init_from", _get(model, "init_from")),
             ("model.backbone.path", _get(model, "backbone.path")))
    for key, path in named:
        if not path or path in CKPT_PATH_KEYWORDS or not Path(path).exists():
            continue
        try:
            check_model_directory(path) if Path(path).is_dir() or is_gguf(path) else check_lightning_checkpoint(path)
        except (FileNotFoundError, ValueError) as error:
            problems.append((key, str(error)))
    return problems


def run_kind_mismatch(path: str, model_class_path: str) -> str | None:
    """What to use instead when ``--ckpt_path`` names another kind of run's checkpoint (``--ckpt_path`` resumes a
    run of the same module; starting PPO from SFT weights is ``--model.init_from``)."""
    checkpoint = read_lightning_checkpoint(path, mmap=True)
    if "tokens_seen" in checkpoint:
        kind = "an SFT run"
    elif any(".value_head." in key or key.startswith("backbone.value_head") for key in checkpoint["state_dict"]):
        kind = "a PPO run"
    else:
        return None
    wanted = (
        "a PPO run" if model_class_path.endswith("PPOModule")
        else "an SFT run" if model_class_path.endswith("SFTModule")
        else kind
    )
    if wanted == kind:
        return None
    return (f"--ckpt_path {path} is a checkpoint of {kind}, and --ckpt_path resumes {wanted} of the same kind; to "
            f"start from its weights use --model.init_from {path}")


def _flatten(node: Any, prefix: str = "") -> Any:
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def last_checkpoint(trainer: Any) -> str | None:
    """The file Lightning resumes from for ``ckpt_path="last"``: the newest ``last*.ckpt`` of the checkpoint
    callbacks (Lightning's own lookup) or an on-exception checkpoint; None when there is none."""
    candidates = {getattr(cb, "ckpt_path", None) for cb in trainer.callbacks if isinstance(cb, OnExceptionCheckpoint)}
    for callback in trainer.checkpoint_callbacks:
        find = getattr(callback, "_find_last_checkpoints", None)
        if find is not None:
            candidates |= set(find(trainer))
    existing = [path for path in candidates if path and os.path.isfile(path)]
    return max(existing, key=os.path.getmtime) if existing else None


# A VLM leaves parameters unused on many batches (the vision tower and cross-attention layers on text-only
# tasks), which plain DDP rejects at its second step; the backbone cannot know in advance, so DDP looks for them.
DDP_FIND_UNUSED = {
    name: f"{name}_find_unused_parameters_true" for name in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")
}


def ddp_strategy(strategy: Any) -> Any:
    """``--trainer.strategy ddp`` (and its spawn/fork/notebook forms) with unused-parameter detection on;
    any other strategy, or an explicit ``ddp_find_unused_parameters_false``, as given."""
    return DDP_FIND_UNUSED.get(strategy, strategy) if isinstance(strategy, str) else strategy


def config_problems(config: Any) -> list[tuple[str, str]]:
    """Checks that a parser cannot make: paths that must exist, variants that must fit the task."""
    # Sizes, rates and free-form fields first: the checks below build config objects, which refuse them too.
    problems = validation.config_problems(config.model, "model.") + validation.config_problems(config.data, "data.")
    if problems:
        return problems
    model = config.model.init_args if "init_args" in config.model else config.model
    data = config.data.init_args if "init_args" in config.data else config.data
    backbone_path = _get(model, "backbone.path")
    if backbone_path and not Path(backbone_path).exists() and not TINY_NAME.match(Path(backbone_path).name):
        problems.append(("model.backbone.path",
                         f"{backbone_path!r} does not exist (tiny-<family>[-small] names are built on first use)"))
    init_from = _get(model, "init_from")
    if init_from and not Path(init_from).exists():
        problems.append(("model.init_from", f"{init_from!r} does not exist"))
    if config.get("weights_only") is False:
        problems.append(("weights_only",
                         "checkpoints are loaded with weights_only=True only: a pickle that needs more could run code"))
    ckpt_path = config.get("ckpt_path")
    if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and not Path(ckpt_path).exists():
        problems.append(("ckpt_path", f"{ckpt_path!r} does not exist"))
    ppo = _get(model, "ppo")
    if ppo is not None:  # settings that must agree with each other (e.g. a group of one under rloo)
        try:
            PPOConfig(**vars(ppo))
        except ValueError as error:
            key, _, message = str(error).partition(": ")
            problems.append((f"model.{key}", message))
    task = (
        TaskConfig(**{k: v for k, v in vars(_get(data, "task") or {}).items()}) if _get(data, "task") else TaskConfig()
    )
    variants = [("data.variant", _get(data, "variant"))] + [
        ("data.evaluation.variants", v) for v in (_get(data, "evaluation.variants") or [])
    ]
    for key, variant in variants:
        if variant is not None and variant not in task.variants:
            problems.append((key, f"variant {variant!r} does not apply to task {task.name!r}; "
                                  f"choose one of {list(task.variants)}"))
    for key, folder in (("data.task.routes", task.routes), ("data.task.ood_routes", task.ood_routes)):
        if folder in task.route_folders() and not _routes_available(folder):
            problems.append(
                (key, f"route folder {folder!r} does not exist and is not named after a synthetic city style")
            )
    llava_json = _get(data, "llava_json")
    if llava_json and not Path(llava_json).exists():
        problems.append(("data.llava_json", f"{llava_json!r} does not exist"))
    return problems


def _routes_available(folder: str) -> bool:
    from lit_sftrl.envs.city import STYLES

    return (Path(folder) / "route_infos.json").exists() or Path(folder).name in STYLES


def _get(namespace: Any, dotted: str) -> Any:
    value = namespace
    for part in dotted.split("."):
        if value is None:
            return None
        value = value.get(part) if hasattr(value, "get") else getattr(value, part, None)
    return value
