"""The paper's protocol at tiny scale on a built-in task: a thin caller of ``lit-sftrl study`` (lit_sftrl/study.py).

    python -m bench.study --task gp_l                                # from the untrained tiny default
    python -m bench.study --task gp_l --base checkpoints/tiny-mllama-base --docs docs/study_base_gp_l

Its flags become a :class:`lit_sftrl.study.StudyConfig` on ``configs/<task>_sft.yaml`` and ``_ppo.yaml``:
``--base`` tests the base first and puts its skills probe (50 items) to the base, Init, SFT and RL; ``--rl-args``
are the RL stage's overrides; ``--seeds N`` runs RL and the continued SFT N times from the one Init (seeds
0..N-1, folders ``rl_seed<s>``/``sft_seed<s>``). The study runs in ``--out`` (``study.json`` there) and resumes
where it stopped when run again with the same flags. With ``--docs``: each run's ``metrics.csv``, evaluation
records, the report and the probe copied there, with the commands and the CPU time of each stage and the study's
results (``study.json``), so the table and curves can be recomputed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
from pathlib import Path

from lit_sftrl.study import InitConfig, ProbeConfig, Study, StudyConfig

TEST_SEED = 1234  # the evaluation seed of every shipped config: the test episodes


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
    parser.add_argument("--seeds", type=int, default=1, help="RL and continued SFT runs from Init, seeds 0..N-1")
    parser.add_argument("--rl-args", default="",
                        help="extra overrides for the RL fit, e.g. '--model.init_args.ppo.kl_coef 0.05'")
    args = parser.parse_args(argv)
    if args.val_seed == TEST_SEED:
        parser.error(f"--val-seed {TEST_SEED} draws the test episodes: choose another seed for validation")
    out = args.out or Path("checkpoints") / f"study_{args.task}"
    base = None if args.base is None else str(args.base)
    try:
        config = StudyConfig(
            out=str(out), sft_config=f"configs/{args.task}_sft.yaml", rl_config=f"configs/{args.task}_ppo.yaml",
            init=InitConfig(steps=args.init_steps), rl_updates=args.updates, base=base, base_test=base is not None,
            rl_overrides=shlex.split(args.rl_args), val_seed=args.val_seed, test_seed=TEST_SEED,
            val_episodes=args.val_episodes, test_episodes=args.test_episodes, seeds=args.seeds,
            probe=None if base is None else ProbeConfig(items=50),
        )
        study = Study(config)
        record = study.run()
    except ValueError as error:
        parser.exit(1, f"bench.study: {error}\n")
    if args.docs is not None:
        names = ["base_test"] * (base is not None) + ["init", *[path.name for path in study.arm_runs()]]
        keep_records(out, args.docs, names)
        sft_steps = [record["flops"][f"sft_steps{suffix}"] for suffix in config.seed_suffixes()]
        summary = {"task": args.task, "base": base or "tiny default", "init_steps": args.init_steps,
                   "updates": args.updates, "rl_args": args.rl_args, "seeds": args.seeds,
                   "sft_steps": sft_steps[0] if args.seeds == 1 else sft_steps,
                   "val_seed": args.val_seed, "flops": record["flops"],
                   "stages": [{"stage": name, **stage} for name, stage in record["stages"].items()],
                   "results": record.get("results")}
        (args.docs / "study.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
