"""V-IRL speed: environment steps per second (text and image modality) and city generation rate.

Each function returns rows ``(name, value, unit, target)`` where ``target`` is the minimum we aim for on one
CPU core; ``bench/env_speed.py`` merges them with the other environments' rows. Run alone:

    python -m bench.virl_speed [--routes DIR] [--seconds 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import Row, format_table
from lit_sftrl.envs.city import TRAIN_STYLE, make_city
from lit_sftrl.envs.virl import VIRLEnv

TEXT_TARGET, IMAGE_TARGET, PANORAMA_TARGET = 2000.0, 50.0, 5.0


def expert_steps_per_second(routes: str | Path, modality: str, seconds: float, image_size: int = 224) -> float:
    """Expert answers through whole episodes (resets included) for about ``seconds``."""
    env = VIRLEnv(str(routes), modality=modality, image_size=image_size)
    steps, episode, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        env.reset(seed=episode)
        episode, done = episode + 1, False
        while not done:
            _, _, terminated, truncated, _ = env.step(env.expert_answer())
            steps, done = steps + 1, terminated or truncated
    return steps / (time.perf_counter() - start)


def city_rows(out: Path, num_routes: int = 20) -> tuple[Path, list[Row]]:
    """Generate a small training-style city into ``out``; the row is its panorama rate."""
    start = time.perf_counter()
    folder = make_city(out, TRAIN_STYLE, num_routes=num_routes, seed=0)
    elapsed = time.perf_counter() - start
    panoramas = len(list((folder / "street_views").glob("*.jpg")))
    return folder, [Row("virl city generation (1024x512 panoramas)", panoramas / elapsed, "panos/s", PANORAMA_TARGET)]


def step_rows(routes: str | Path, seconds: float = 2.0) -> list[Row]:
    return [
        Row("virl text steps", expert_steps_per_second(routes, "text", seconds), "/s", TEXT_TARGET),
        Row("virl image steps (224 px grid)", expert_steps_per_second(routes, "image", seconds), "/s", IMAGE_TARGET),
    ]


def virl_rows(routes: str | Path | None = None, seconds: float = 2.0) -> list[Row]:
    """All V-IRL rows; without ``routes`` a small city is generated in a temporary folder (and timed)."""
    if routes is not None:
        return step_rows(routes, seconds)
    with tempfile.TemporaryDirectory() as tmp:
        folder, rows = city_rows(Path(tmp) / TRAIN_STYLE)
        return rows + step_rows(folder, seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", help="an existing route folder (default: generate a small city)")
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    print(format_table(virl_rows(args.routes, args.seconds)))

if __name__ == "__main__":
    main()
