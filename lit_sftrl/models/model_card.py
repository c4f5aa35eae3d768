"""The model card (README.md) an export carries: what the weights are, how they were made, how well they do.

Everything comes from the run that wrote the checkpoint: its hyper-parameters (base model, LoRA), its FLOPs
counter, the run directory's ``config.yaml`` (task, optimiser, the command to reproduce it) and its newest
evaluation records (``eval/*.json``: success and the other metrics, each with its standard error).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any

import yaml


def _run_config(ckpt: Path) -> tuple[Path | None, dict[str, Any]]:
    config = ckpt.resolve().parent.parent / "config.yaml"  # <run>/checkpoints/<file>.ckpt
    try:
        return config, yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None, {}


def _latest_evaluations(run_dir: Path) -> list[dict[str, Any]]:
    """The newest record of each stage (test before val), read defensively: a card never fails an export."""
    latest: dict[str, dict[str, Any]] = {}
    for path in sorted((run_dir / "eval").glob("*.json")) if (run_dir / "eval").is_dir() else ():
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        stage = record.get("stage")
        if stage in ("val", "test") and record.get("step", -1) >= latest.get(stage, {}).get("step", -1):
            latest[stage] = record
    return [latest[stage] for stage in ("test", "val") if stage in latest]


def _method(checkpoint: dict[str, Any], config: dict[str, Any]) -> str:
    class_path = str(((config.get("model") or {}).get("class_path")) or "")
    if class_path.endswith("PPOModule") or (not class_path and "tokens_seen" not in checkpoint):
        return "PPO (reinforcement learning on the environment's rewards)"
    return "SFT (supervised fine-tuning on expert episodes)"


def model_card(ckpt: str | Path, checkpoint: dict[str, Any], flops: float, merge_lora: bool) -> str:
    ckpt = Path(ckpt)
    config_path, config = _run_config(ckpt)
    hparams = checkpoint.get("hyper_parameters") or {}
    backbone = hparams.get("backbone") or {}
    if dataclasses.is_dataclass(backbone):  # checkpoints written outside the CLI keep the config object
        backbone = dataclasses.asdict(backbone)
    model_args = ((config.get("model") or {}).get("init_args")) or {}
    task = ((((config.get("data") or {}).get("init_args")) or {}).get("task")) or {}
    lora = ""
    if backbone.get("lora"):
        lora = f" with LoRA {backbone['lora']}" + (" (merged)" if merge_lora else " (adapter only)")
    init_from = f", initialised from `{hparams['init_from']}`" if hparams.get("init_from") else ""
    verify_iter = f" (verify_iter {task['verify_iter']})" if task.get("verify_iter") else ""
    lines = [
        "# lit-sftrl export", "",
        f"- **Base model**: `{backbone.get('path', '?')}`{lora}",
        f"- **Method**: {_method(checkpoint, config)}{init_from}",
        f"- **Task**: {task.get('name', '?')}{verify_iter}",
        f"- **Optimiser**: {model_args.get('optim') or 'defaults'}",
        f"- **Training compute**: {flops:.4g} FLOPs over {checkpoint.get('global_step', '?')} optimizer steps "
        "(cumulative, including the runs it started from)",
        f"- **Source checkpoint**: `{ckpt.resolve()}`",
    ]
    evaluations = _latest_evaluations(ckpt.resolve().parent.parent)
    if evaluations:
        lines += ["", "## Evaluation", "", "| stage | step | variant | metric | value | standard error |",
                  "|---|---|---|---|---|---|"]
        for record in evaluations:
            for variant, metrics in sorted((record.get("metrics") or {}).items()):
                for name, value in sorted(metrics.items()):
                    if name.endswith("_stderr") or f"{name}_stderr" not in metrics:
                        continue
                    lines.append(f"| {record['stage']} | {record.get('step')} | {variant} | {name} | {value:.3f} | "
                                 f"{metrics[f'{name}_stderr']:.3f} |")
    else:
        lines += ["", "No evaluation records were found beside the checkpoint."]
    lines += ["", "## How it was made", "", "```"]
    if config_path is not None:
        lines.append(f"lit-sftrl fit --config {shlex.quote(str(config_path))}")
    adapter = "" if merge_lora else " --adapter_only true"
    lines += [f"lit-sftrl export --ckpt {shlex.quote(str(ckpt))} --out OUT{adapter}", "```", ""]
    return "\n".join(lines)
