"""The tools of ``lit-sftrl`` beside fit/validate/test: plain functions whose signatures and docstrings are their
command lines (:mod:`lit_sftrl.cli` registers each with jsonargparse), so every option is typed, documented once,
settable from ``--config FILE`` and printed by ``--print_config``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from lit_sftrl.envs.city import STYLES
from lit_sftrl.models.tiny import FAMILIES, SIZES
from lit_sftrl.pretraining.pretrain import PretrainConfig

# The choices are the builders' own tuples (one home); Literal gives the command line its choices and its check.
Family = Literal[FAMILIES]  # type: ignore[valid-type]
Size = Literal[SIZES]  # type: ignore[valid-type]
Style = Literal[tuple(sorted(STYLES))]  # type: ignore[valid-type]


def make_tiny(out: Path, family: Family = "mllama", size: Size = "tiny", seed: int = 0) -> Path:
    """Build a tiny offline model of a VLM family (tokenizer trained on the environments' text).

    Args:
        out: the model directory to write.
        family: the architecture: ``mllama`` (Llama-3.2-Vision) or ``llava``.
        size: ``tiny`` (~4 M parameters) or ``small`` (~20 M).
        seed: seed of the initial weights.
    """
    if out.exists():  # build_tiny keeps an existing folder as it is: "wrote DIR" would be untrue
        raise FileExistsError(f"--out {str(out)!r} already exists: nothing was written (choose a new folder, or "
                              "delete that one)")
    from lit_sftrl.pretraining.corpus import build_tiny

    return build_tiny(out, family=family, size=size, seed=seed)


def pretrain(base: PretrainConfig = PretrainConfig()) -> Path:
    """Build a tiny model and pretrain it on the skills corpus: a pretrained base (configs/pretrain_base.yaml).

    Args:
        base: the pretraining run: model, corpus, optimisation and time cap.
    """
    from lit_sftrl.pretraining.pretrain import pretrain_base

    return pretrain_base(base)


def make_city(style: Style, routes: int, out: Path, seed: int = 0) -> Path:
    """Generate a synthetic V-IRL city in the official route format.

    Args:
        style: the city style: ``metro`` (the training city) or ``harbor`` (the visual-OOD one).
        routes: number of routes.
        out: the route folder to write.
        seed: seed of the city's layout, landmarks and routes.
    """
    from lit_sftrl.envs.city import make_city as generate

    return generate(out, style=style, num_routes=routes, seed=seed)


def export(ckpt: Path, out: Path, adapter_only: bool = False) -> Path:
    """Turn an SFT/PPO Lightning checkpoint into a standard Hugging Face directory.

    Args:
        ckpt: Lightning checkpoint of an SFT or PPO run.
        out: the directory to write (all or nothing: written beside it, then renamed).
        adapter_only: save the LoRA adapter instead of merging it into the weights.
    """
    from lit_sftrl.models.export import export_checkpoint

    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {str(out)!r} is a file: export writes a model folder; nothing was written")
    return export_checkpoint(ckpt, out, merge_lora=not adapter_only)


def report(runs: list[Path], out: Path, smooth: int = 0, seeds: int = 1, tests: bool = False) -> Path:
    """Plot success vs FLOPs and Init/SFT/RL bars from run directories.

    Args:
        runs: run directories (checkpoints/<run>), each with its eval/*.json records.
        out: the folder for curves.png, bars.png, recognition.png and report.md.
        smooth: Savitzky-Golay window over the curves (0 = off; order 3).
        seeds: the first N SFT runs and the first N RL runs are N seeds of one recipe: the bars show their mean
            with its standard error over seeds.
        tests: each SFT and RL bar is its run's last test record, whatever its FLOPs (runs whose compute was
            matched when they were made, as ``lit-sftrl study`` makes them).
    """
    from lit_sftrl.report import make_report

    return make_report(runs, out, smooth=smooth, seeds=seeds, tests=tests)
