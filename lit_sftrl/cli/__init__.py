"""The ``lit-sftrl`` command: LightningCLI's fit/validate/test, plus the project's own tools.

    lit-sftrl fit --config configs/gp_l_sft.yaml [--model.backbone.path DIR] [--trainer.devices 8 ...]
    lit-sftrl make-tiny --family mllama --out checkpoints/tiny-mllama
    lit-sftrl make-tiny --pretrain        # pretrained base: configs/pretrain_base.yaml -> checkpoints/tiny-mllama-base
    lit-sftrl make-city --style metro --routes 1000 --seed 0 --out data/virl/metro
    lit-sftrl export --ckpt checkpoints/gp_l_sft/checkpoints/last.ckpt --out exported/gp_l_sft
    lit-sftrl report checkpoints/gp_l_sft checkpoints/gp_l_ppo --out reports/gp_l
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

LIGHTNING_COMMANDS = ("fit", "validate", "test")  # no predict: validate/test play episodes (and keep transcripts)
TOOLS_HELP = {
    "make-tiny": "build a tiny offline model of a VLM family (tokenizer trained on the environments' text)",
    "make-city": "generate a synthetic V-IRL city in the official route format",
    "export": "turn an SFT/PPO Lightning checkpoint into a standard Hugging Face directory",
    "report": "plot success vs FLOPs and Init/SFT/RL bars from run directories",
}


VERBOSE_ENV = "LIT_SFTRL_VERBOSE"


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``lit-sftrl``); its return value is the process's exit status, so it returns None.

    Whatever goes wrong ends in one line naming the problem; the traceback behind it is printed with ``--verbose``
    (anywhere on the command line) or ``LIT_SFTRL_VERBOSE=1``. The expected refusals say what to do; anything else
    is reported as unexpected, its type and message on that line."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in args or os.environ.get(VERBOSE_ENV, "") not in ("", "0")
    if "--verbose" in args:
        args.remove("--verbose")
        sys.argv[1:] = args if argv is None else sys.argv[1:]
    try:
        run(None if argv is None else args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:  # noqa: BLE001 - the one place every other failure is turned into a line
        if verbose:
            raise
        first = (str(error).strip().splitlines() or [""])[0]
        sys.exit(f"lit-sftrl: {type(error).__name__}: {first} (the traceback: add --verbose or set {VERBOSE_ENV}=1)")


def run(argv: list[str] | None = None) -> Any:
    """Run one command and return what it made (a path, or the LightningCLI object): what tests call."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_overview())
        return None
    if argv[0] in TOOLS_HELP:
        return _run_tool(argv[0], argv[1:])
    if argv[0] not in LIGHTNING_COMMANDS:
        sys.exit(f"lit-sftrl: unknown command {argv[0]!r}\n\n{_overview()}")
    return cli_main(None if from_command_line else argv)


def cli_main(argv: list[str] | None) -> Any:
    """Run LightningCLI in-process on ``argv`` (None: the command line)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lit_sftrl.cli.trainer import SftRlCLI

    return SftRlCLI(args=argv)


def _overview() -> str:
    lines = [
        "usage: lit-sftrl COMMAND [options]   (lit-sftrl COMMAND --help for a command's options)", "",
        "training (LightningCLI):",
    ]
    lines += [f"  {name:<10} {what}" for name, what in (
        ("fit", "train: SFT or PPO, as the --config file says"),
        ("validate", "evaluate a model on the validation episodes of every variant"),
        ("test", "evaluate a model on the paper-sized test episodes of every variant"),
    )]
    lines += ["", "tools:"] + [f"  {name:<10} {what}" for name, what in TOOLS_HELP.items()]
    return "\n".join(lines)


def _run_tool(name: str, argv: list[str]) -> Any:
    parser = argparse.ArgumentParser(prog=f"lit-sftrl {name}", description=TOOLS_HELP[name])
    command: Callable[[argparse.Namespace], Any] = {
        "make-tiny": _make_tiny, "make-city": _make_city, "export": _export, "report": _report,
    }[name](parser)
    args = parser.parse_args(argv)
    try:
        path = command(args)
    except (OSError, ValueError) as error:  # missing or existing paths, a file where a folder goes, a full disk
        sys.exit(f"lit-sftrl {name}: {error}")
    print(f"wrote {path}")
    return path


def _make_tiny(parser: argparse.ArgumentParser) -> Callable:
    from lit_sftrl.models.tiny import FAMILIES, SIZES

    parser.add_argument("--family", choices=FAMILIES, default="mllama")
    parser.add_argument("--size", choices=SIZES, default="tiny", help="tiny ~4M parameters, small ~20M")
    parser.add_argument("--seed", type=int, default=None, help="default 0 (with --pretrain: the config's)")
    parser.add_argument("--out", type=Path, help="model directory (with --pretrain: default from the config)")
    parser.add_argument("--pretrain", action="store_true", help="then fit it on the skills corpus: a pretrained base")
    parser.add_argument("--config", type=Path, help="with --pretrain: YAML (default configs/pretrain_base.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="with --pretrain: override a "
                        "config key, e.g. --set max_steps=100 --set skills.size=500")

    def command(args: argparse.Namespace) -> Path:
        if args.pretrain:
            from lit_sftrl.pretraining.pretrain import load_config, pretrain_base

            given = {"out": args.out, "seed": args.seed, "family": args.family, "size": args.size}
            given = [f"{key}={value}" for key, value in given.items() if value is not None]
            return pretrain_base(load_config(args.config, given + args.set))
        if args.out is None:
            raise ValueError("--out is required (without --pretrain)")
        if args.out.exists():  # make_tiny keeps an existing folder as it is: "wrote DIR" would be untrue
            raise FileExistsError(f"--out {str(args.out)!r} already exists: nothing was written (choose a new folder, "
                                  "or delete that one)")
        from lit_sftrl.pretraining.corpus import build_tiny

        return build_tiny(args.out, family=args.family, size=args.size, seed=args.seed or 0)

    return command


def _make_city(parser: argparse.ArgumentParser) -> Callable:
    from lit_sftrl.envs.city import STYLES

    parser.add_argument("--style", choices=sorted(STYLES), required=True)
    parser.add_argument("--routes", type=int, required=True, help="number of routes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)

    def command(args: argparse.Namespace) -> Path:
        from lit_sftrl.envs.city import make_city

        return make_city(args.out, style=args.style, num_routes=args.routes, seed=args.seed)

    return command


def _export(parser: argparse.ArgumentParser) -> Callable:
    parser.add_argument("--ckpt", type=Path, required=True, help="Lightning checkpoint of an SFT or PPO run")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--adapter-only", action="store_true", help="save the LoRA adapter instead of merging it")

    def command(args: argparse.Namespace) -> Path:
        from lit_sftrl.models.export import export_checkpoint

        if args.out.exists() and not args.out.is_dir():
            raise FileExistsError(f"--out {str(args.out)!r} is a file: export writes a model folder; nothing was "
                                  "written")

        return export_checkpoint(args.ckpt, args.out, merge_lora=not args.adapter_only)

    return command


def _report(parser: argparse.ArgumentParser) -> Callable:
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (checkpoints/<run>)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smooth", type=int, default=0, help="Savitzky-Golay window (0 = off; order 3)")

    def command(args: argparse.Namespace) -> Path:
        from lit_sftrl.report import make_report

        return make_report(args.runs, args.out, smooth=args.smooth)

    return command


if __name__ == "__main__":
    main()
