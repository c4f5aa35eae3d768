"""The ``lit-sftrl`` command: LightningCLI's fit/validate/test, plus the project's tools, every one parsed by
jsonargparse with ``--config FILE`` and ``--print_config``.

    lit-sftrl fit --config configs/gp_l_sft.yaml [--model.backbone.path DIR] [--trainer.devices 8 ...]
    lit-sftrl make-tiny --family mllama --out checkpoints/tiny-mllama
    lit-sftrl pretrain --config configs/pretrain_base.yaml     # the pretrained base -> checkpoints/tiny-mllama-base
    lit-sftrl make-city --style metro --routes 1000 --seed 0 --out data/virl/metro
    lit-sftrl export --ckpt checkpoints/gp_l_sft/checkpoints/last.ckpt --out exported/gp_l_sft
    lit-sftrl report checkpoints/gp_l_sft checkpoints/gp_l_ppo --out reports/gp_l
    lit-sftrl study --config configs/study/gp_l.yaml    # base -> Init -> SFT and RL at matched compute -> report

A tool is a function in :mod:`lit_sftrl.cli.tools` (or anywhere): its signature is its command line and its
docstring its help, registered in ``TOOLS`` below by one line, as LitGPT registers its commands.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from typing import Any, get_origin

from lit_sftrl.run.quiet import quiet_console

LIGHTNING_COMMANDS = {  # no predict: validate/test play episodes (and keep transcripts)
    "fit": "train: SFT or PPO, as the --config file says",
    "validate": "evaluate a model on the validation episodes of every variant",
    "test": "evaluate a model on the paper-sized test episodes of every variant",
}
# Commands whose whole config is one dataclass with its own jsonargparse parser (--config, --print_config).
STUDY_HELP = "the SFT-vs-RL study: Init, then SFT and RL at matched compute, tests, report (resumable)"


def registered_tools() -> dict[str, Callable[..., Any]]:
    """Command name -> the function it runs, one line each. Imported when a tool runs, not for fit/validate/test."""
    from lit_sftrl.cli.tools import export, make_city, make_tiny, pretrain, report

    return {
        "make-tiny": make_tiny,
        "pretrain": pretrain,
        "make-city": make_city,
        "export": export,
        "report": report,
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
    if argv[0] in LIGHTNING_COMMANDS:
        return cli_main(None if from_command_line else argv)
    if argv[0] in registered_tools():
        return run_tool(argv[0], argv[1:])
    if argv[0] == "study":
        return _study(argv[1:])
    sys.exit(f"lit-sftrl: unknown command {argv[0]!r}\n\n{_overview()}")


def cli_main(argv: list[str] | None) -> Any:
    """Run LightningCLI in-process on ``argv`` (None: the command line)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_console()  # before importing Lightning and transformers: some of their modules warn as they load
    from lit_sftrl.cli.trainer import SftRlCLI

    return SftRlCLI(args=argv)


def _overview() -> str:
    lines = ["usage: lit-sftrl COMMAND [options]   (lit-sftrl COMMAND --help for a command's options)", "",
             "training (LightningCLI):"]
    lines += [f"  {name:<10} {what}" for name, what in LIGHTNING_COMMANDS.items()]
    lines += ["", "tools:"] + [f"  {name:<10} {_summary(function)}" for name, function in registered_tools().items()]
    lines += [f"  {'study':<10} {STUDY_HELP}"]
    return "\n".join(lines)


def _study(argv: list[str]) -> Any:
    from lit_sftrl.study import study

    try:
        return study(argv)
    except ValueError as error:
        sys.exit(f"lit-sftrl study: {error}")


def _summary(function: Callable[..., Any]) -> str:
    return (inspect.getdoc(function) or "").split("\n", 1)[0].rstrip(".")


def tool_parser(name: str, function: Callable[..., Any]) -> Any:
    """The command line of ``function``: ``--config``, ``--print_config`` and one option per parameter, typed and
    documented by its signature and docstring; a required list parameter (``report``'s runs) is positional."""
    from jsonargparse import ActionConfigFile

    from lit_sftrl.core.validation import install_yaml_limits
    from lit_sftrl.run.cli_errors import ShortErrorParser

    install_yaml_limits()  # a tool's --config goes through the same size and alias limits as fit's
    # No abbreviations: argparse would read a misspelt --base.max_step as --base.max_steps without a word.
    parser = ShortErrorParser(prog=f"lit-sftrl {name}", description=_summary(function), default_env=False,
                              allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options (--print_config "
                        "writes one)")
    positional = [p for p in inspect.signature(function).parameters.values()
                  if p.default is inspect.Parameter.empty and get_origin(_annotation(function, p.name)) is list]
    for parameter in positional:
        annotation = _annotation(function, parameter.name)
        parser.add_argument(parameter.name, nargs="+", type=annotation.__args__[0],
                            help=_parameter_doc(function, parameter.name))
    parser.add_function_arguments(function, skip={p.name for p in positional}, as_positional=False)
    return parser


def run_tool(name: str, argv: list[str]) -> Any:
    """Parse ``argv`` for tool ``name`` and run it; a mistake the user can fix ends in one line."""
    function = registered_tools()[name]
    parser = tool_parser(name, function)
    config = parser.parse_args(argv)
    config.pop("config", None)
    settings = parser.instantiate_classes(config)
    arguments = {key: settings[key] for key in inspect.signature(function).parameters}
    try:
        path = function(**arguments)
    except (OSError, ValueError) as error:  # missing or existing paths, a file where a folder goes, a full disk
        sys.exit(f"lit-sftrl {name}: {error}")
    print(f"wrote {path}")
    return path


def _annotation(function: Callable[..., Any], name: str) -> Any:
    import typing

    return typing.get_type_hints(function)[name]


def _parameter_doc(function: Callable[..., Any], name: str) -> str:
    from docstring_parser import parse

    return next((p.description for p in parse(inspect.getdoc(function) or "").params if p.arg_name == name), "")

