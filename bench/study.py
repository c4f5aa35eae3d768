"""The paper's protocol at tiny scale, end to end, with the documented commands (docs/spec.md §6-§8).

    python bench/study.py --task gp_l --out checkpoints/study_gp_l

1. SFT from the tiny default to an Init checkpoint (the paper's shared SFT initialisation).
2. From Init, PPO for ``--updates`` updates; then continued SFT for as many steps as match PPO's FLOPs.
3. ``lit-sftrl test`` of Init, SFT and RL on every variant (234 GeneralPoints hands each by default).
4. ``lit-sftrl report`` of the three.

Every command is printed before it runs, so the README can quote them. Nothing is tuned on the test episodes:
they are drawn from their own seed and only ever evaluated.
"""

from __future__ import annotations

import argparse
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

BIN = str(Path(sys.executable).with_name("lit-sftrl"))


def lit_sftrl(*args: str) -> None:
    command = ["lit-sftrl", *args]
    print("$ " + shlex.join(command), flush=True)
    start = time.perf_counter()
    subprocess.run([BIN, *args], check=True)
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def run_dir(out: Path, name: str, val_episodes: int | None = None) -> list[str]:
    """Overrides that put a run's checkpoints, logs and evaluation records in ``out/name``."""
    path = str(out / name)
    overrides = ["--trainer.default_root_dir", path, "--trainer.logger.init_args.save_dir", path]
    if val_episodes is not None:
        overrides += ["--data.init_args.evaluation.val_episodes", str(val_episodes)]
    return overrides


def flops_of(checkpoint: Path) -> tuple[float, int]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)  # never run a pickle's code
    counter = state["flops"]
    total = (
        counter["initial"]
        + counter["num_parameters"] * (6 * counter["train_tokens"] + 2 * counter["inference_tokens"])
    )
    return total, int(state["global_step"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="gp_l", choices=["gp_l", "gp_vl", "virl_l", "virl_vl"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--init-steps", type=int, default=600, help="SFT steps to the Init checkpoint")
    parser.add_argument("--updates", type=int, default=10, help="PPO updates from Init")
    parser.add_argument("--test-episodes", type=int, default=None, help="per variant (default: the paper's)")
    parser.add_argument("--val-episodes", type=int, default=None, help="per variant during fit (default: config's)")
    args = parser.parse_args(argv)
    out = args.out or Path("checkpoints") / f"study_{args.task}"
    sft_config, ppo_config = f"configs/{args.task}_sft.yaml", f"configs/{args.task}_ppo.yaml"
    start = time.perf_counter()

    lit_sftrl("fit", "--config", sft_config, "--trainer.max_steps", str(args.init_steps),
              *run_dir(out, "init", args.val_episodes))
    init = out / "init" / "checkpoints" / "last.ckpt"
    init_flops, _ = flops_of(init)

    lit_sftrl("fit", "--config", ppo_config, "--model.init_from", str(init),
              "--trainer.max_epochs", str(args.updates), *run_dir(out, "rl", args.val_episodes))
    rl_flops, _ = flops_of(out / "rl" / "checkpoints" / "last.ckpt")

    # Continued SFT: as many steps as PPO's extra compute buys at the Init run's FLOPs per step.
    per_step = init_flops / args.init_steps
    sft_steps = max(1, math.floor((rl_flops - init_flops) / per_step))
    lit_sftrl("fit", "--config", sft_config, "--model.init_from", str(init),
              "--trainer.max_steps", str(sft_steps), "--trainer.val_check_interval", str(max(1, sft_steps // 2)),
              *run_dir(out, "sft", args.val_episodes))

    episodes = (
        [] if args.test_episodes is None else ["--data.init_args.evaluation.test_episodes", str(args.test_episodes)]
    )
    for name, config, checkpoint in (
        ("init_test", sft_config, init),
        ("sft", sft_config, out / "sft" / "checkpoints" / "last.ckpt"),
        ("rl", ppo_config, out / "rl" / "checkpoints" / "last.ckpt"),
    ):
        lit_sftrl("test", "--config", config, "--ckpt_path", str(checkpoint), *episodes, *run_dir(out, name))

    lit_sftrl("report", str(out / "init_test"), str(out / "sft"), str(out / "rl"), "--out", str(out / "report"))
    print(f"study done in {(time.perf_counter() - start) / 60:.1f} min; "
          f"Init {init_flops / 1e9:.0f} GFLOPs, RL {rl_flops / 1e9:.0f} GFLOPs, SFT {sft_steps} more steps")


if __name__ == "__main__":
    main()
