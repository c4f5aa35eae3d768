"""LightningCLI for lit-sftrl: YAML in, a checked config, then a model. Nothing is built from a bad config."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from lit_sftrl.datamodules import EpisodeDataModule
from lit_sftrl.models.tiny import TINY_NAME
from lit_sftrl.policy import PolicyModule
from lit_sftrl.tasks import TaskConfig


class SftRlCLI(LightningCLI):
    """``model`` is an SFTModule or PPOModule, ``data`` an SFTDataModule or RLDataModule (``class_path`` in YAML)."""

    def __init__(self, args: list[str] | None = None) -> None:
        super().__init__(
            PolicyModule,
            EpisodeDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={"default_env": False},
            args=args,
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        problems = config_problems(config)
        if problems:
            lines = "\n".join(f"  {key}: {message}" for key, message in problems)
            sys.exit(f"lit-sftrl {self.subcommand}: the config has problems, nothing was run:\n{lines}")


def config_problems(config: Any) -> list[tuple[str, str]]:
    """Checks that a parser cannot make: paths that must exist, variants that must fit the task."""
    problems: list[tuple[str, str]] = []
    model = config.model.init_args if "init_args" in config.model else config.model
    data = config.data.init_args if "init_args" in config.data else config.data
    backbone_path = _get(model, "backbone.path")
    if backbone_path and not Path(backbone_path).exists() and not TINY_NAME.match(Path(backbone_path).name):
        problems.append(("model.backbone.path", f"{backbone_path!r} does not exist (tiny-<family>[-small] names are built on first use)"))
    init_from = _get(model, "init_from")
    if init_from and not Path(init_from).exists():
        problems.append(("model.init_from", f"{init_from!r} does not exist"))
    ckpt_path = config.get("ckpt_path")
    if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and not Path(ckpt_path).exists():
        problems.append(("ckpt_path", f"{ckpt_path!r} does not exist"))
    task = TaskConfig(**{k: v for k, v in vars(_get(data, "task") or {}).items()}) if _get(data, "task") else TaskConfig()
    variants = [("data.variant", _get(data, "variant"))] + [
        ("data.evaluation.variants", v) for v in (_get(data, "evaluation.variants") or [])
    ]
    for key, variant in variants:
        if variant is not None and variant not in task.variants:
            problems.append((key, f"variant {variant!r} does not apply to task {task.name!r}; choose one of {list(task.variants)}"))
    for key, folder in (("data.task.routes", task.routes), ("data.task.ood_routes", task.ood_routes)):
        if folder in task.route_folders() and not _routes_available(folder):
            problems.append((key, f"route folder {folder!r} does not exist and is not named after a synthetic city style"))
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
