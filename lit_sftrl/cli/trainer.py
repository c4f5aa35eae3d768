"""LightningCLI for lit-sftrl: YAML in, a checked config, then a model. Nothing is built from a bad config."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_sftrl.core import validation
from lit_sftrl.core.disk import DiskFull
from lit_sftrl.core.validation import config_value
from lit_sftrl.data.datamodules import EpisodeDataModule
from lit_sftrl.data.tasks import TaskConfig
from lit_sftrl.envs.contract import ContractError
from lit_sftrl.models.export import check_lightning_checkpoint, is_distributed_checkpoint, read_lightning_checkpoint
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
    changed_settings,
    clear_run_directory,
    keep_previous_config,
    place_in_run_directory,
    previous_run_files,
    remove_orphan_temporaries,
    run_directory,
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
        except validation.YamlLimitExceeded as error:  # a config file over the size limit, refused before reading
            print(f"lit-sftrl: {error}; nothing was run", file=sys.stderr)
            sys.exit(2)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        problems = config_problems(config)
        if problems:
            lines = "\n".join(f"  {key}: {message}" for key, message in problems)
            sys.exit(f"lit-sftrl {self.subcommand}: the config has problems, nothing was run:\n{lines}")
        refusal = strategy_refusal(config)
        if refusal:
            sys.exit(f"lit-sftrl {self.subcommand}: {refusal}; nothing was run")
        if config.get("dry_run"):  # config.json is all the plan reads: the weights need not be there
            print_plan(config)
            sys.exit(0)
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

        The one private LightningCLI method this class overrides: no public hook runs between parsing and that
        merge, and the checkpoint's ``hyper_parameters`` are the export contract (``models/export.py``), so they
        stay. tests/test_lightning_cli_contract.py pins the stock behaviour this relies on (the method exists, runs
        before ``before_instantiate_classes`` and merges ``hyper_parameters``): when Lightning changes it, that
        test fails and this override can go.
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

    @contextmanager
    def _run_directory(self, subcommand: str) -> Iterator[None]:
        """Hold the run directory's lock (one writer at a time) while the subcommand runs, its orphan temporary
        checkpoints of a killed run removed first; a fit into another run's directory is refused here. Only
        global rank 0 locks: the other ranks are the same run."""
        lock = None
        if self.trainer.global_rank == 0:
            run_dir = run_directory(self.trainer)
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
                    self._refuse_a_changed_config(lock.run_dir)
            yield
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
            try:
                clear_run_directory(run_dir)
            except ValueError as error:
                sys.exit(f"lit-sftrl fit: {error}")
            return
        sys.exit(f"lit-sftrl fit: run directory {str(run_dir)!r} already holds a run ({', '.join(previous[:4])}): "
                 "resume it with --ckpt_path last, choose another --trainer.default_root_dir, or replace it with "
                 "--overwrite true; nothing was run")

    def _refuse_a_changed_config(self, run_dir: Path) -> None:
        """A resume whose config differs from the run's saved one in anything that changes what is trained (another
        task, batch size, backbone, LoRA...) trained on silently and replaced the run's config.yaml: refused with
        the differing keys, unless ``--allow_config_change true``, which keeps the old config beside the new."""
        ckpt_path = self._get(self.config, "ckpt_path")
        if not ckpt_path:
            return
        saved_path = run_dir / "config.yaml"
        if ckpt_path not in CKPT_PATH_KEYWORDS and not saved_path.is_file():  # a checkpoint of another run directory
            saved_path = Path(ckpt_path).resolve().parent.parent / "config.yaml"
        if not saved_path.is_file():
            return
        try:
            saved = validation.read_yaml_file(saved_path)
        except (OSError, ValueError) as error:
            sys.exit(f"lit-sftrl fit: the run's config {saved_path} cannot be read ({error}); nothing was run")
        import yaml

        parser = self._parser(self.subcommand)
        current = yaml.safe_load(parser.dump(self.config[self.subcommand], skip_none=False))
        changes = changed_settings(saved if isinstance(saved, dict) else {}, current)
        if not changes:
            return
        if not self._get(self.config, "allow_config_change"):
            shown = "\n".join(f"  {change}" for change in changes[:20])
            more = f"\n  ... and {len(changes) - 20} more" if len(changes) > 20 else ""
            sys.exit(f"lit-sftrl fit: --ckpt_path {ckpt_path} resumes a run whose config ({saved_path}) differs in "
                     f"what it trains; nothing was run:\n{shown}{more}\nResume with the run's own config "
                     f"(--config {saved_path}), or add --allow_config_change true to train on under the new one "
                     "(the old config is kept beside it)")
        if saved_path.parent == run_dir:
            kept = keep_previous_config(run_dir)
            print(f"lit-sftrl fit: resuming under a changed config ({len(changes)} settings); the run's previous "
                  f"config is kept as {kept}", file=sys.stderr)

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
        parser.add_argument("--allow_config_change", type=bool, default=False,
                            help="resume (--ckpt_path) under a config that differs from the run's saved one in what "
                                 "it trains; the old config.yaml is kept as config-before-resume-N.yaml")
        parser.add_argument("--dry_run", type=bool, default=False,
                            help="print the run's memory per device and FLOPs per update (from the model's "
                                 "config.json alone, no weights) and stop")
        parser.add_argument("--dry_run_prompt_tokens", type=int, default=1024,
                            help="with --dry_run: text tokens of the longest prompt the plan assumes")

    # LightningCLI calls before_<subcommand> once the trainer exists: only then does "--ckpt_path last" name a file.
    def before_fit(self) -> None:
        self._check_last_checkpoint()

    def before_validate(self) -> None:
        self._check_last_checkpoint()

    before_test = before_validate

    def _check_last_checkpoint(self) -> None:
        """Resolve ``--ckpt_path last`` to a whole file, or refuse naming one. When the ``last.ckpt`` write failed
        (a full disk: its message says "resume with --ckpt_path last"), Lightning found no last checkpoint, warned
        and trained from step 0 beside the run's other checkpoints: the newest whole one is resumed instead."""
        self._resume_from = None
        if self._get(self.config, "ckpt_path") == "hpc":  # Lightning's newest <run>/hpc_ckpt_N.ckpt, checked the same
            path = getattr(self.trainer._checkpoint_connector, "_hpc_resume_path", None)
            try:
                if path:
                    check_lightning_checkpoint(path)
            except (FileNotFoundError, ValueError) as error:
                sys.exit(f"lit-sftrl {self.subcommand}: --ckpt_path hpc: {error}; nothing was run")
            return
        if self._get(self.config, "ckpt_path") != "last":
            return
        path = last_checkpoint(self.trainer)
        if path is not None:
            try:
                check_lightning_checkpoint(path)
                return
            except (FileNotFoundError, ValueError) as error:
                whole = newest_whole_checkpoint(self.trainer, exclude=path)
                instead = f"--ckpt_path {whole}" if whole else "--ckpt_path PATH"
                sys.exit(f"lit-sftrl {self.subcommand}: --ckpt_path last: {error}; nothing was run. "
                         f"Resume from the newest whole checkpoint with {instead}.")
        saved = run_checkpoints(self.trainer)
        if not saved:  # a new run: Lightning warns and starts from scratch
            return
        whole = newest_whole_checkpoint(self.trainer)
        if whole is None:
            names = ", ".join(str(p) for p in saved[:4])
            sys.exit(f"lit-sftrl {self.subcommand}: --ckpt_path last: the run has no last checkpoint and none of its "
                     f"checkpoints reads back whole ({names}); nothing was run")
        print(f"lit-sftrl {self.subcommand}: --ckpt_path last: no last checkpoint (its write failed?); resuming from "
              f"the newest whole one, {whole}", file=sys.stderr)
        self._resume_from = whole

    # LightningCLI runs these methods in place of the trainer's (tests/test_lightning_cli_contract.py pins it): each
    # holds the run directory and reads checkpoints with weights_only=True only (a pickle naming other code would
    # run it; config_problems refuses --weights_only false, this pins what the trainer's own restore does).
    def _trainer_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """What the trainer's own method gets: checkpoints read with weights_only=True only, and the newest whole
        checkpoint in place of ``last`` when the last one's write failed (``_parse_ckpt_path``)."""
        resume_from = getattr(self, "_resume_from", None)
        return {**kwargs, "weights_only": True, **({"ckpt_path": resume_from} if resume_from else {})}

    def fit(self, model: Any, **kwargs: Any) -> None:
        """``trainer.fit``: a run that repeated non-finite losses stopped ends, from the shell, with its message
        (which names the checkpoint it saved), not a traceback."""
        with self._run_directory("fit"):
            self.log_whole_config()
            try:
                self.trainer.fit(model, **self._trainer_kwargs(kwargs))
            except (FloatingPointError, validation.LimitExceeded, validation.DataError, DiskFull) as error:
                if not self._command_line:
                    raise
                sys.exit(f"lit-sftrl fit: {error}")

    def validate(self, model: Any, **kwargs: Any) -> None:
        with self._run_directory("validate"):
            self.trainer.validate(model, **self._trainer_kwargs(kwargs))

    def test(self, model: Any, **kwargs: Any) -> None:
        with self._run_directory("test"):
            self.trainer.test(model, **self._trainer_kwargs(kwargs))


def checkpoint_problems(config: Any) -> list[tuple[str, str]]:
    """Checkpoint files and model directories the config names that do not read back whole (truncated,
    corrupted, not lit-sftrl's): refused here, naming the file, instead of failing deep inside Lightning, torch or
    transformers after the model is built."""
    model = config.model.init_args if "init_args" in config.model else config.model
    problems = []
    named = (("ckpt_path", config.get("ckpt_path")), ("model.init_from", config_value(model, "init_from")),
             ("model.backbone.path", config_value(model, "backbone.path")))
    for key, path in named:
        if not path or path in CKPT_PATH_KEYWORDS or not Path(path).exists():
            continue
        try:
            if (Path(path).is_dir() and not is_distributed_checkpoint(path)) or is_gguf(path):
                check_model_directory(path)
            else:  # a checkpoint file, or a sharded run's checkpoint directory
                check_lightning_checkpoint(path)
        except (FileNotFoundError, ValueError) as error:
            problems.append((key, str(error)))
    return problems


def strategy_refusal(config: Any) -> str | None:
    """A strategy the module cannot train under, named before any model is built: PPO steps its optimizer
    several times inside one Lightning step (manual optimisation), which DeepSpeed's engine does not support."""
    from lit_sftrl.training.plan import uses_deepspeed

    model_class = str(config_value(config, "model.class_path") or "")
    if model_class.endswith("PPOModule") and uses_deepspeed(config_value(config, "trainer.strategy")):
        return ("PPO does not run under DeepSpeed (it is for SFT); shard PPO with FSDP2 instead: "
                "--config configs/strategies/fsdp.yaml")
    return None


def print_plan(config: Any) -> None:
    """``--dry_run``: the plan of :mod:`lit_sftrl.training.plan` for this config, from config.json alone."""
    from lit_sftrl.training.plan import plan_run, settings_from_config

    backbone, settings, strategy = settings_from_config(config, int(config.get("dry_run_prompt_tokens") or 1024))
    model = config.model.init_args if "init_args" in config.model else config.model
    plan = plan_run(backbone.path, backbone, settings,
                    value_head_hidden=config_value(model, "backbone.value_head_hidden"))
    print(f"{plan.table()}\n  strategy: {strategy}, precision: {config.trainer.get('precision')}")


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
    existing = [path for path in candidates if path and (os.path.isfile(path) or is_distributed_checkpoint(path))]
    return max(existing, key=os.path.getmtime) if existing else None


def run_checkpoints(trainer: Any) -> list[Path]:
    """Every ``*.ckpt`` file in the run's checkpoint folders, newest first."""
    folders = {Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)}
    files = {path for folder in folders if folder.is_dir() for path in folder.glob("*.ckpt") if path.is_file()}
    return sorted(files, key=lambda path: path.stat().st_mtime, reverse=True)


def newest_whole_checkpoint(trainer: Any, exclude: str | None = None) -> str | None:
    """The newest of the run's checkpoints that reads back whole; None when there is none."""
    for path in run_checkpoints(trainer):
        if exclude and path.resolve() == Path(exclude).resolve():
            continue
        try:
            check_lightning_checkpoint(path)
        except (FileNotFoundError, ValueError):
            continue
        return str(path)
    return None


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
    backbone_path = config_value(model, "backbone.path")
    if backbone_path and not Path(backbone_path).exists() and not TINY_NAME.match(Path(backbone_path).name):
        problems.append(("model.backbone.path",
                         f"{backbone_path!r} does not exist (tiny-<family>[-small] names are built on first use)"))
    saved_modules = _saved_modules_problem(model)
    if saved_modules:
        problems.append(("model.backbone.lora.modules_to_save", saved_modules))
    init_from = config_value(model, "init_from")
    if init_from and not Path(init_from).exists():
        problems.append(("model.init_from", f"{init_from!r} does not exist"))
    if config.get("weights_only") is False:
        problems.append(("weights_only",
                         "checkpoints are loaded with weights_only=True only: a pickle that needs more could run code"))
    ckpt_path = config.get("ckpt_path")
    if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and not Path(ckpt_path).exists():
        problems.append(("ckpt_path", f"{ckpt_path!r} does not exist"))
    ppo = config_value(model, "ppo")
    if ppo is not None:  # settings that must agree with each other (e.g. a group of one under rloo)
        try:
            PPOConfig(**vars(ppo))
        except ValueError as error:
            key, _, message = str(error).partition(": ")
            problems.append((f"model.{key}", message))
    fields = config_value(data, "task") or {}
    try:  # as_dict: wrappers arrive as a list of Namespaces
        task = TaskConfig(**(fields.as_dict() if hasattr(fields, "as_dict") else dict(fields)))
    except ValueError as error:  # a preset's name, variants, wrappers: what the parser cannot judge
        key, _, message = str(error).partition(": ")  # "task.variants.id.x: ..." names its key
        return [(f"data.{key}", message) if key.startswith("task") else ("data.task", str(error))]
    variants = [("data.variant", config_value(data, "variant"))] + [
        ("data.evaluation.variants", v) for v in (config_value(data, "evaluation.variants") or [])
    ]
    for key, variant in variants:
        if variant is not None and variant not in task.variant_names:
            problems.append((key, f"variant {variant!r} does not apply to task {task.name!r}; "
                                  f"choose one of {list(task.variant_names)}"))
    if not problems and not task.is_preset:  # your own environment: does it give what the trainer reads?
        # SFT from a data file needs no expert_answer()
        from_files = config_value(data, "llava_json") or config_value(data, "messages")
        plays_expert = str(config.data.get("class_path", "")).endswith("SFTDataModule") and not from_files
        try:
            task.check_contract(expert=plays_expert, suboptimal=plays_expert and bool(config_value(data, "multi_turn")))
        except (ContractError, ValueError) as error:
            problems.append(("data.task.env", str(error)))
        paper_mode = config_value(model, "compute.mode") == "paper" and not config_value(model, "compute.buffer_ratio")
        if paper_mode and str(config.model.get("class_path", "")).endswith("PPOModule"):
            problems.append(("model.compute.buffer_ratio", "compute mode 'paper' needs it for your own environment "
                                                           "(the paper measured it for GeneralPoints and V-IRL only)"))
    for key, folder in (("data.task.routes", task.routes), ("data.task.ood_routes", task.ood_routes)):
        if folder in task.route_folders() and not _routes_available(folder):
            problems.append(
                (key, f"route folder {folder!r} does not exist and is not named after a synthetic city style")
            )
        elif folder in task.route_folders() and (Path(folder) / "route_infos.json").exists():
            problem = _route_folder_problem(folder, task)
            if problem:
                problems.append((key, problem))
    messages = config_value(data, "messages")
    if messages and not Path(messages).exists():
        problems.append(("data.messages", f"{messages!r} does not exist"))
    if config_value(data, "llava_json") and messages:
        problems.append(("data.messages", "data.llava_json names training data too: give one of the two"))
    llava_json = config_value(data, "llava_json")
    if llava_json and not Path(llava_json).exists():
        problems.append(("data.llava_json", f"{llava_json!r} does not exist"))
    elif llava_json:  # every sample and image checked now, not when the first batch draws it after the model is built
        from lit_sftrl.data.llava_data import checked_llava_json

        limits = {key: config_value(data, key) for key in ("max_image_pixels", "max_image_bytes", "max_turn_chars")}
        try:
            checked_llava_json(llava_json, config_value(data, "image_folder"),
                               **{key: value for key, value in limits.items() if value is not None})
        except (OSError, ValueError) as error:
            problems.append(("data.llava_json", str(error)))
    return problems


def _saved_modules_problem(model: Any) -> str | None:
    """``backbone.lora.modules_to_save`` against the architecture at ``backbone.path`` (its config.json, on the meta
    device: no weights read), so that a misspelt name is refused before the run directory is made. A tiny model not
    built yet, a GGUF file, and quantised modules are checked when the model loads."""
    saved = config_value(model, "backbone.lora.modules_to_save")
    path = config_value(model, "backbone.path")
    if not saved or not path or is_gguf(path) or not (Path(path) / "config.json").is_file():
        return None
    from lit_sftrl.models.loading import DEFAULT_LORA_TARGETS, check_modules_to_save
    from lit_sftrl.training.plan import meta_model

    targets = config_value(model, "backbone.lora.target_modules")
    try:
        check_modules_to_save(meta_model(str(path)), list(saved), DEFAULT_LORA_TARGETS if targets is None else targets)
    except ValueError as error:
        return str(error).partition(": ")[2]
    return None


def _route_folder_problem(folder: str, task: TaskConfig) -> str | None:
    """Read a route folder (routes, and the panorama mapping where the task shows images) as its environments will,
    so that what is wrong with it is one line now, not a traceback after the model is built."""
    import pickle

    from lit_sftrl.envs.routes import load_route_folder

    try:
        routes = load_route_folder(folder, task.max_milestones, task.max_image_pixels)
        if task.is_visual and routes.has_mapping:
            routes.nearest(routes.routes[0].start)
    except (OSError, ValueError, pickle.UnpicklingError) as error:
        return str(error)
    return None


def _routes_available(folder: str) -> bool:
    from lit_sftrl.envs.city import STYLES

    return (Path(folder) / "route_infos.json").exists() or Path(folder).name in STYLES

