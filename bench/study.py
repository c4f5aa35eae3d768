"""The paper's protocol at tiny scale, end to end, with the documented commands (docs/spec.md §6-§8).

    python -m bench.study --task gp_l                                # from the untrained tiny default
    python -m bench.study --task gp_l --base checkpoints/tiny-mllama-base --docs docs/study_base_gp_l

0. With ``--base``: ``lit-sftrl test`` of the base itself (its own score before any post-training).
1. SFT from the base to an Init checkpoint (the paper's shared SFT initialisation).
2. From Init, PPO for ``--updates`` updates; then continued SFT for as many steps as match PPO's FLOPs.
3. ``lit-sftrl test`` of Init, SFT and RL on every variant (234 GeneralPoints hands each by default).
4. ``lit-sftrl report`` of the three.
5. With ``--base``: the base's held-out skill questions put to the base, Init, SFT and RL
   (``bench/probe_base.py --after``, ``probe/probe.json``): what each post-training kept of what the base knew.
6. With ``--docs``: each run's ``metrics.csv``, evaluation records, the report and the probe copied there, with
   the commands and the CPU time of each stage (``study.json``), so the table and curves can be recomputed.

Every command is printed before it runs, so the README can quote them. Nothing is tuned on the test episodes:
they are drawn from their own seed (1234) and only ever evaluated; the validation passes during fits draw
theirs from ``--val-seed``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

from bench.common import run_cli, run_command
from lit_sftrl.models.export import inherited_flops

TEST_SEED = 1234  # the evaluation seed of every shipped config: the test episodes
STAGES: list[dict] = []  # each command with its wall and CPU seconds, for study.json


def lit_sftrl(*args: str) -> None:
    STAGES.append(run_cli(*args))


def run_dir(out: Path, name: str, validation: list[str] | None = None) -> list[str]:
    """Overrides that put a run's checkpoints, logs and evaluation records in ``out/name``."""
    path = str(out / name)
    return ["--trainer.default_root_dir", path, "--trainer.logger.init_args.save_dir", path, "--overwrite", "true",
            *(validation or [])]


def test_dir(out: Path, name: str) -> list[str]:
    """A test into its own run directory, or (SFT, RL) beside the fit whose checkpoint it evaluates."""
    path = str(out / name)
    return ["--trainer.default_root_dir", path, "--trainer.logger.init_args.save_dir", path]


def keep_records(out: Path, docs: Path, names: list[str]) -> None:
    """Copy what the table and curves are computed from (metrics, evaluation records, report) into ``docs``,
    replacing what an earlier study left there: records of two runs must never mix."""
    for name in [*names, "report", "probe"]:
        shutil.rmtree(docs / name, ignore_errors=True)
    for name in names:
        source, target = out / name, docs / name
        target.mkdir(parents=True)
        for path in [source / "metrics.csv", source / "config.yaml"]:
            if path.exists():
                shutil.copy2(path, target / path.name)
        if (source / "eval").exists():
            shutil.copytree(source / "eval", target / "eval")
    for folder in ("report", "probe"):
        if (out / folder).exists():
            shutil.copytree(out / folder, docs / folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="gp_l", choices=["gp_l", "gp_vl", "virl_l", "virl_vl"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--init-steps", type=int, default=600, help="SFT steps to the Init checkpoint")
    parser.add_argument("--updates", type=int, default=10, help="PPO updates from Init")
    parser.add_argument("--test-episodes", type=int, default=None, help="per variant (default: the paper's)")
    parser.add_argument("--val-episodes", type=int, default=None, help="per variant during fit (default: config's)")
    parser.add_argument("--val-seed", type=int, default=4321, help="seed of the validation episodes during fits")
    parser.add_argument("--base", type=Path, default=None, help="the model to start from (default: tiny default)")
    parser.add_argument("--docs", type=Path, default=None, help="copy metrics and evaluation records here")
    parser.add_argument("--rl-args", default="",
                        help="extra overrides for the RL fit, e.g. '--model.init_args.ppo.kl_coef 0.05'")
    args = parser.parse_args(argv)
    if args.val_seed == TEST_SEED:
        parser.error(f"--val-seed {TEST_SEED} draws the test episodes: choose another seed for validation")
    out = args.out or Path("checkpoints") / f"study_{args.task}"
    sft_config, ppo_config = f"configs/{args.task}_sft.yaml", f"configs/{args.task}_ppo.yaml"
    base = [] if args.base is None else ["--model.init_args.backbone.path", str(args.base)]
    validation = [*base, "--data.init_args.evaluation.seed", str(args.val_seed)]
    if args.val_episodes is not None:
        validation += ["--data.init_args.evaluation.val_episodes", str(args.val_episodes)]
    episodes = (
        [] if args.test_episodes is None else ["--data.init_args.evaluation.test_episodes", str(args.test_episodes)]
    )
    start = time.perf_counter()

    if args.base is not None:  # the base's own score, before any post-training
        lit_sftrl("test", "--config", sft_config, *base, *episodes, *run_dir(out, "base_test"))
    lit_sftrl("fit", "--config", sft_config, "--trainer.max_steps", str(args.init_steps),
              *run_dir(out, "init", validation))
    init = out / "init" / "checkpoints" / "last.ckpt"
    init_flops = inherited_flops(init)

    lit_sftrl("fit", "--config", ppo_config, "--model.init_from", str(init),
              "--trainer.max_epochs", str(args.updates), *run_dir(out, "rl", validation), *shlex.split(args.rl_args))
    rl_flops = inherited_flops(out / "rl" / "checkpoints" / "last.ckpt")

    # Continued SFT: as many steps as PPO's extra compute buys at the Init run's FLOPs per step.
    per_step = init_flops / args.init_steps
    sft_steps = max(1, math.floor((rl_flops - init_flops) / per_step))
    lit_sftrl("fit", "--config", sft_config, "--model.init_from", str(init),
              "--trainer.max_steps", str(sft_steps), "--trainer.val_check_interval", str(max(1, sft_steps // 2)),
              *run_dir(out, "sft", validation))

    for name, config, checkpoint in (
        ("init_test", sft_config, init),
        ("sft", sft_config, out / "sft" / "checkpoints" / "last.ckpt"),
        ("rl", ppo_config, out / "rl" / "checkpoints" / "last.ckpt"),
    ):
        lit_sftrl("test", "--config", config, "--ckpt_path", str(checkpoint), *base, *episodes, *test_dir(out, name))

    lit_sftrl("report", str(out / "init_test"), str(out / "sft"), str(out / "rl"), "--out", str(out / "report"))
    if args.base is not None:
        probe = str(Path(__file__).with_name("probe_base.py"))
        after = [f"--after={name}={out / name / 'checkpoints' / 'last.ckpt'}" for name in ("init", "sft", "rl")]
        argv = [probe, str(args.base), "--items", "50", *after, "--out", str(out / "probe")]
        shown = ["python", "-m", "bench.probe_base", *argv[1:]]  # as the README quotes it, from the repository root
        STAGES.append(run_command([sys.executable, *argv], shown=shown))
    print(f"study done in {(time.perf_counter() - start) / 60:.1f} min; "
          f"Init {init_flops / 1e9:.0f} GFLOPs, RL {rl_flops / 1e9:.0f} GFLOPs, SFT {sft_steps} more steps")
    if args.docs is not None:
        names = ["base_test"] * (args.base is not None) + ["init", "init_test", "rl", "sft"]
        keep_records(out, args.docs, names)
        record = {"task": args.task, "base": str(args.base or "tiny default"), "init_steps": args.init_steps,
                  "updates": args.updates, "rl_args": args.rl_args, "sft_steps": sft_steps, "val_seed": args.val_seed,
                  "flops": {"init": init_flops, "rl": rl_flops}, "stages": STAGES}
        (args.docs / "study.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
