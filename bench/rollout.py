"""Rollout speed on GP-L: one at a time, the lockstep batch and the in-flight batch: ``python -m bench.rollout``.

``--models tiny,sft`` (the default) measures the untrained tiny Mllama and an SFT model of the main job's
recipe (``configs/gp_l_sft.yaml`` without its evaluations, ``--sft-steps`` optimizer steps, exported; trained
on first use under ``--sft-dir`` and reused after). ``--task gp_vl`` runs the same on card images.

Every mode plays the SAME ``--episodes`` (32) to their ends with the same model, sampling settings (temperature
1, 64 new tokens) and value head, in one process; sampling is seeded per episode and attempt (the engine's
evaluation seeds), so every mode gives the same answers, which the script checks:

* one at a time: the original research code's loop: one environment, one prompt per ``generate`` call, the
  whole conversation encoded at every turn, the next prompt only after the environment judged the answer;
* lockstep: :class:`lit_sftrl.training.rollout.RolloutEngine` with ``decoding="lockstep"``, ``num_envs`` (16)
  environments, one batched ``generate`` per round that decodes until its longest answer ends (the engine
  before in-flight batching), conversations continued from their caches;
* in-flight: the engine's default: 16 slots; an answer that ends leaves the batch at once, its environment
  steps and its next prompt is prefilled and joins the running batch (``lit_sftrl/models/inflight.py``).

Reported: attempts per second, the speed-ups over one at a time, the ceiling and the in-flight speed-up's
fraction of it, the share of the in-flight rollout's time outside the model (target <= 15 %), and the share of
padded tokens in PPO's micro-batches over the in-flight rollout's attempts (the GP-L PPO config's shape:
mini-batches of 32, micro-batches of 16, 2 epochs of shuffles), drawn in shuffled order and grouped by length.

The ceiling bounds what ANY batched engine can reach with this model forward on this machine: the
one-at-a-time time per attempt over the in-flight rollout's time per attempt in one-token decoding steps alone
(as if prefill, sampling and environments cost nothing). The fraction of it that in-flight reaches is therefore
the in-flight run's share of time in one-token steps. Prompt tokens must be prefilled by any engine, all but
those a perfect prefix cache would share (the prompts' distinct prefixes, across episodes too, less the answer
tokens that decoding steps already fed), so no engine decoding these answers with this forward can pass its steps
over its steps plus those tokens at the cost per token of the run's cheapest prefill forward (reported as the
highest reachable fraction).
The time outside the model is everything outside the engine's model calls, plus the processor's prompt encoding
and the decoding of answers inside them.

Threads: the default is one intra-op thread. On a shared 2-core machine two threads make OpenMP spin-wait and
batched matrix products 5-10x slower; ``--threads 0`` keeps torch's own choice. ``--device cuda --dtype
bfloat16`` runs on a GPU (``bench/device.sh``).
"""

from __future__ import annotations

import argparse
import functools
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.common import Row, format_table
from lit_sftrl.core.seeding import stream_seed
from lit_sftrl.data.tasks import TaskConfig
from lit_sftrl.models import Backbone, BackboneConfig, SamplingConfig
from lit_sftrl.models.inflight import InflightDecoder
from lit_sftrl.training.micro_batches import PaddingMeter, as_drawn
from lit_sftrl.training.rollout import RolloutEngine

MODES = ("one at a time", "lockstep", "in-flight")


@dataclass(frozen=True)
class Prefill:
    """One forward over prompt tokens: how many (padding left out), its seconds, and whether it continued cached
    keys and values (its attention mask is wider than its input)."""

    tokens: int
    seconds: float
    continued: bool


@dataclass
class Timers:
    """Seconds spent in the pieces of a rollout, accumulated by wrappers around the backbone's parts."""

    seconds: dict[str, float] = field(
        default_factory=lambda: {"backbone": 0.0, "prefill": 0.0, "steps": 0.0, "encode": 0.0, "decode": 0.0}
    )
    synchronize: Callable[[], None] = lambda: None  # a GPU runs asynchronously: wait before reading the clock
    prefills: list[Prefill] = field(default_factory=list)  # one per prefill forward

    def wrap(self, key: str, function: Callable) -> Callable:
        @functools.wraps(function)  # generate reads the model forward's signature (position_ids) through it
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.synchronize()
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.synchronize()
                self.seconds[key] += time.perf_counter() - start

        return timed

    def reset(self) -> None:
        for key in self.seconds:
            self.seconds[key] = 0.0
        self.prefills = []


def instrument(backbone: Backbone) -> Timers:
    """Time the backbone's own entry points (one at a time), the forwards over whole prompts (prefill, value) and
    the one-token decoding steps, and the parts that are not the model: the processor's prompt encoding and the
    decoding of answers."""
    timers = Timers()
    if backbone.device.type == "cuda":
        timers.synchronize = torch.cuda.synchronize
    for name in ("generate", "prompt_values", "score"):
        setattr(backbone, name, timers.wrap("backbone", getattr(backbone, name)))
    forward = backbone.model.forward
    prefill, step = timers.wrap("prefill", forward), timers.wrap("steps", forward)

    @functools.wraps(forward)
    def classified_forward(*args: Any, **kwargs: Any) -> Any:
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if ids is not None and ids.shape[1] == 1:
            return step(*args, **kwargs)
        before = timers.seconds["prefill"]
        try:
            return prefill(*args, **kwargs)
        finally:
            if ids is not None:  # the prompt tokens this forward processed, padding left out
                tokens = ids.numel() if mask is None else int(mask[:, -ids.shape[1] :].sum())
                continued = mask is not None and mask.shape[1] > ids.shape[1]
                timers.prefills.append(Prefill(tokens, timers.seconds["prefill"] - before, continued))

    backbone.model.forward = classified_forward
    backbone.encoder.encode_prompts = timers.wrap("encode", backbone.encoder.encode_prompts)
    backbone.tokenizer.decode = timers.wrap("decode", backbone.tokenizer.decode)
    return timers


@dataclass
class Run:
    mode: str
    attempts: int
    episodes: int  # episodes played
    seconds: float
    parts: dict[str, float]  # Timers.seconds; "backbone": all time inside the model calls
    answers: dict[tuple[int, int], list[int]]  # (episode seed, attempt) -> answer token ids
    prefills: list[Prefill] = field(default_factory=list)  # Timers.prefills
    sequences: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (prompt, answer ids) per attempt

    @property
    def lengths(self) -> list[tuple[int, int]]:
        """(prompt, answer) tokens per recorded attempt."""
        return [(len(prompt), len(answer)) for prompt, answer in self.sequences]

    @functools.cached_property
    def tokens_to_prefill(self) -> int | None:
        """:func:`fewest_prompt_tokens` of its attempts (None: not recorded)."""
        return fewest_prompt_tokens(self.sequences) if self.sequences else None

    @property
    def prefill_floor(self) -> float:
        """The seconds its prefills would take if only the prompt tokens no engine can skip were prefilled, each at
        the cost per token of its cheapest forward (padding free): a lower bound on the prefill time of any engine
        that runs this forward."""
        tokens = sum(p.tokens for p in self.prefills) if self.tokens_to_prefill is None else self.tokens_to_prefill
        return tokens * min((p.seconds / p.tokens for p in self.prefills if p.tokens), default=0.0)

    def seconds_per_prompt_token(self, continued: bool) -> float | None:
        """Prefill seconds per prompt token over the forwards of new prompts, or of prompts continuing a cache."""
        chosen = [p for p in self.prefills if p.continued == continued]
        tokens = sum(p.tokens for p in chosen)
        return sum(p.seconds for p in chosen) / tokens if tokens else None

    @property
    def model_seconds(self) -> float:
        return self.parts["backbone"] - self.parts["encode"] - self.parts["decode"]

    @property
    def attempts_per_second(self) -> float:
        return self.attempts / self.seconds

    @property
    def outside_share(self) -> float:
        return 1.0 - self.model_seconds / self.seconds


def fewest_prompt_tokens(attempts: list[tuple[list[int], list[int]]]) -> int:
    """The fewest prompt tokens any engine must prefill to answer these ``(prompt ids, answer ids)`` attempts: the
    prompts' distinct prefixes (an engine with perfect prefix caching computes a shared prefix once, across
    episodes too), less those a decoding step already fed (an answer's tokens but its last, which reappear in the
    conversation's next prompt)."""
    children: dict[tuple[int, int], int] = {}  # (prefix node, next token) -> node of the longer prefix
    prompted, decoded = set(), set()
    for prompt, answer in attempts:
        node, path = 0, []
        for token in [*prompt, *answer[:-1]]:
            node = children.setdefault((node, token), len(children) + 1)
            path.append(node)
        prompted.update(path[: len(prompt)])
        decoded.update(path[len(prompt) :])
    return len(prompted - decoded)


def episode_seeds(count: int, seed: int = 0) -> list[int]:
    return [stream_seed("ppo_episodes", seed, 0, 0, n) for n in range(count)]


class RecordingEngine(RolloutEngine):
    """The engine, recording each answer (by episode seed and attempt) and its prompt and answer token ids;
    ``min_join`` replaces the in-flight decoder's default."""

    def __init__(self, *args: Any, min_join: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answers: dict[tuple[int, int], list[int]] = {}
        self.sequences: list[tuple[torch.Tensor, torch.Tensor]] = []  # (prompt ids, answer ids) per attempt
        self.min_join = min_join

    def _decoder(self, slots):
        decoder = super()._decoder(slots)
        if self.min_join is not None and isinstance(decoder, InflightDecoder):
            decoder.min_join = self.min_join
        return decoder

    def _advance(self, envs, running, decoder):
        for i, generation, step in super()._advance(envs, running, decoder):
            self.answers[(running[i].episode[0], running[i].result.attempts - 1)] = generation.answer_ids.tolist()
            self.sequences.append((generation.prompt_ids, generation.answer_ids))  # to lists after the clock stops
            yield i, generation, step


def batched(backbone: Backbone, timers: Timers, task: TaskConfig, sampling: SamplingConfig, seeds: list[int],
            num_envs: int, decoding: str, min_join: int | None = None) -> Run:
    """The engine's evaluation loop (the decoder PPO's collect uses) over the episodes of ``seeds``."""
    envs = [task.make_env("id") for _ in range(num_envs)]
    engine = RecordingEngine(backbone, sampling, decoding=decoding, min_join=min_join)
    timers.reset()
    start = time.perf_counter()
    results = engine.evaluate(envs, [(seed, {}) for seed in seeds])
    timers.synchronize()
    seconds = time.perf_counter() - start
    parts = {**timers.seconds, "backbone": engine.seconds["model"]}
    mode = "in-flight" if decoding == "inflight" else decoding
    sequences = [(prompt.tolist(), answer.tolist()) for prompt, answer in engine.sequences]
    return Run(mode, sum(r.attempts for r in results), len(results), seconds, parts, engine.answers,
               list(timers.prefills), sequences)


def one_at_a_time(backbone: Backbone, timers: Timers, task: TaskConfig, sampling: SamplingConfig,
                  seeds: list[int]) -> Run:
    """One environment, one answer per generate call, each episode to its end, sampled with the seeds the
    engine's evaluation uses (so every mode gives the same answers)."""
    env = task.make_env("id")
    answers: dict[tuple[int, int], list[int]] = {}
    timers.reset()
    start = time.perf_counter()
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        done, attempt = False, 0
        while not done:
            prompt = (obs["messages"], obs.get("image"))
            sample_seed = stream_seed("eval_sampling", seed, attempt)
            (generation,) = backbone.generate([prompt], sampling, seeds=[sample_seed])
            answers[(seed, attempt)] = generation.answer_ids.tolist()
            obs, _, terminated, truncated, _ = env.step(generation.text)
            done, attempt = terminated or truncated, attempt + 1
    seconds = time.perf_counter() - start
    return Run("one at a time", len(answers), len(seeds), seconds, dict(timers.seconds), answers,
               prefills=list(timers.prefills))


def load(path: str | Path, device: str = "cpu", dtype: str = "float32") -> Backbone:
    return Backbone(BackboneConfig(path=str(path), value_head=True, dtype=dtype)).to(device).eval()


def measure(path: str | Path, num_envs: int = 16, episodes: int = 32, max_new_tokens: int = 64, repeats: int = 1,
            task_name: str = "gp_l", seed: int = 0, device: str = "cpu", dtype: str = "float32",
            min_join: int | None = None) -> dict[str, Run]:
    """Best of ``repeats`` runs of each mode (interleaved, so a slow spell of a shared machine hits all)."""
    backbone = load(path, device, dtype)
    timers = instrument(backbone)
    task = TaskConfig(name=task_name, verify_iter=5)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=max_new_tokens)
    seeds = episode_seeds(episodes, seed)
    warm = task.make_env("id")  # a process's first generate calls are slower (lazy set-up)
    obs, _ = warm.reset(seed=0)
    for size in (1, num_envs):
        backbone.generate([(obs["messages"], obs.get("image"))] * size, SamplingConfig(max_new_tokens=4))
    best: dict[str, Run] = {}
    for repeat in range(repeats):
        torch.manual_seed(seed + repeat)
        runs = [one_at_a_time(backbone, timers, task, sampling, seeds),
                batched(backbone, timers, task, sampling, seeds, num_envs, "lockstep"),
                batched(backbone, timers, task, sampling, seeds, num_envs, "inflight", min_join)]
        for run in runs:
            if run.mode not in best or run.seconds < best[run.mode].seconds:
                best[run.mode] = run
    return best


def ceiling(fast: Run, slow: Run) -> float:
    """The one-at-a-time time per attempt over the batched time per attempt spent in one-token decoding steps
    alone: no batched engine decoding with this forward can beat it, whatever it does about the rest."""
    return (slow.seconds / slow.attempts) / (fast.parts["steps"] / fast.attempts)


def padding_shares(lengths: list[tuple[int, int]], minibatch: int = 32, micro: int = 16, epochs: int = 2,
                   seed: int = 0) -> dict[str, float]:
    """Padding of PPO's micro-batches over these attempts, shuffled into mini-batches as PPO shuffles them."""
    meter, rng = PaddingMeter(lengths), random.Random(seed)
    unpacked = [0, 0]  # the layout before packing: a row cost the longest prompt plus the longest answer
    for _ in range(epochs):
        order = list(range(len(lengths)))
        rng.shuffle(order)
        for start in range(0, len(order), minibatch):
            meter.split(order[start : start + minibatch], micro)
            for drawn in as_drawn(order[start : start + minibatch], micro):
                width = max(lengths[i][0] for i in drawn) + max(lengths[i][1] for i in drawn)
                unpacked[0] += len(drawn) * width - sum(sum(lengths[i]) for i in drawn)
                unpacked[1] += len(drawn) * width
    return {**meter.shares(), "padding_share_unpacked_as_drawn": unpacked[0] / max(unpacked[1], 1)}


def rows_of(runs: dict[str, Run], label: str = "GP-L") -> list[Row]:
    slow, lockstep, inflight = (runs[mode] for mode in MODES)
    bound = ceiling(inflight, slow)
    # what the engine would reach if only its model forwards cost time (prefill is work any engine must do)
    forward_bound = (slow.seconds / slow.attempts) / ((inflight.parts["steps"] + inflight.parts["prefill"])
                                                       / inflight.attempts)
    speedup = inflight.attempts_per_second / slow.attempts_per_second
    # The fraction of the ceiling is the in-flight run's share of time in one-token steps; no engine decoding these
    # answers with this forward can do better than its steps plus the prompt tokens it cannot skip at their cheapest.
    reachable = inflight.parts["steps"] / (inflight.parts["steps"] + inflight.prefill_floor)
    padding = padding_shares(inflight.lengths)
    return [
        Row(f"rollout {label}, one at a time", slow.attempts_per_second, "attempts/s", None),
        Row(f"rollout {label}, lockstep batch", lockstep.attempts_per_second, "attempts/s", None),
        Row(f"rollout {label}, in-flight batch", inflight.attempts_per_second, "attempts/s", None),
        Row(f"rollout {label}, lockstep / one at a time", lockstep.attempts_per_second / slow.attempts_per_second,
            "x", None),
        Row(f"rollout {label}, in-flight / one at a time", speedup, "x", None),
        Row(f"rollout {label}, ceiling: one at a time / in-flight decoding steps", bound, "x", None),
        Row(f"rollout {label}, in-flight: fraction of the ceiling", 100.0 * speedup / bound, "%", 90.0),
        Row(f"rollout {label}, any engine: highest fraction of the ceiling "
            "(unskippable prompt tokens at their cheapest)", 100.0 * reachable, "%", None),
        # The shared table's targets are lower bounds: the outside-model share (target <= 15 %) is shown as
        # the model's share of the rollout time (target >= 85 %).
        Row(f"rollout {label}, in-flight: model share of time", 100.0 * (1.0 - inflight.outside_share), "%", 85.0),
        Row(f"rollout {label}, in-flight: fraction of the forward-time bound (steps + prefill)",
            100.0 * speedup / forward_bound, "%", None),
        Row(f"rollout {label}, PPO micro-batches: padded tokens as drawn, unpacked layout (before)",
            100.0 * padding["padding_share_unpacked_as_drawn"], "%", None),
        Row(f"rollout {label}, PPO micro-batches: padded tokens as drawn", 100.0 * padding["padding_share_as_drawn"],
            "%", None),
        Row(f"rollout {label}, PPO micro-batches: padded tokens grouped by length", 100.0 * padding["padding_share"],
            "%", None),
    ]


def rollout_rows(path: str | Path | None = None, episodes: int = 32, repeats: int = 1, threads: int = 1) -> list[Row]:
    """The rows of :func:`rows_of` on ``path`` or a freshly built tiny Mllama, with ``threads`` intra-op threads
    (0: torch's default)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runs = measure(path or _build_tiny(tmp), episodes=episodes, repeats=repeats)
    finally:
        torch.set_num_threads(previous)
    return rows_of(runs)


def _build_tiny(tmp: str, size: str = "tiny") -> Path:
    from lit_sftrl.pretraining.corpus import build_tiny

    return build_tiny(Path(tmp) / f"tiny-mllama{'-small' if size == 'small' else ''}", family="mllama", size=size)


def sft_model(directory: Path, steps: int, task: str = "gp_l") -> Path:
    """An exported SFT model of the main job's recipe (``configs/<task>_sft.yaml``, evaluations off, ``steps``
    optimizer steps); trained on first use, reused after. Every command is printed so the README can quote it."""
    exported = directory / "exported"
    if (exported / "config.json").exists():
        return exported
    binary = str(Path(sys.executable).with_name("lit-sftrl"))
    run = directory / "run"
    commands = [
        ["fit", "--config", f"configs/{task}_sft.yaml", "--trainer.max_steps", str(steps),
         "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
         "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run)],
        ["export", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", str(exported)],
    ]
    for command in commands:
        print("$ " + shlex.join(["lit-sftrl", *command]), flush=True)
        subprocess.run([binary, *command], check=True)
    return exported


def breakdown(run: Run) -> str:
    p = run.parts
    outside = run.seconds - run.model_seconds
    rest = run.model_seconds - p["prefill"] - p["steps"]
    per_token = [("of new prompts", run.seconds_per_prompt_token(continued=False)),
                 ("continuing cached ones", run.seconds_per_prompt_token(continued=True))]
    return (
        f"{run.mode}: {run.attempts} attempts of {run.episodes} episodes in {run.seconds:.2f} s "
        f"({run.attempts_per_second:.2f}/s)\n"
        f"    model {run.model_seconds:.2f} s = whole-prompt forwards (prefill, values) {p['prefill']:.2f} s "
        f"+ one-token decoding steps {p['steps']:.2f} s + sampling, batch and cache bookkeeping {rest:.2f} s\n"
        f"    prefilled {sum(p.tokens for p in run.prefills)} prompt tokens in {len(run.prefills)} forwards"
        + (f" (any engine: at least {run.tokens_to_prefill})" if run.tokens_to_prefill is not None else "")
        + f"; those at the cheapest forward's cost per token {run.prefill_floor:.2f} s; per token "
        + " / ".join(f"{1e6 * cost:.0f} us in forwards {kind}" for kind, cost in per_token if cost is not None)
        + "\n"
        f"    outside the model {outside:.2f} s ({100 * run.outside_share:.1f} %) = processor/prompt encoding "
        f"{p['encode']:.2f} s + decoding {p['decode']:.2f} s + environments, parsing, engine "
        f"{outside - p['encode'] - p['decode']:.2f} s"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,sft",
                        help="comma-separated: tiny, small (untrained tiny Mllamas), sft (see --sft-steps), or paths")
    parser.add_argument("--task", default="gp_l", choices=["gp_l", "gp_vl"], help="GP-L (the target's) or GP-VL")
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--min-join", type=int, default=None,
                        help="in-flight: fewest prompts that join while rows decode (default: half the slots)")
    parser.add_argument("--episodes", type=int, default=32, help="episodes each mode plays to their end")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs of each mode")
    parser.add_argument("--sft-steps", type=int, default=600, help="optimizer steps of the SFT model (recipe: 600)")
    parser.add_argument("--sft-dir", type=Path, default=Path("checkpoints/bench_rollout/sft"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default 1: on a shared 2-core machine more threads make OpenMP spin; "
        "0 = torch's default)",
    )
    args = parser.parse_args(argv)
    label = {"gp_l": "GP-L", "gp_vl": "GP-VL"}[args.task]
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name in ("tiny", "small"):
                path = _build_tiny(tmp, name)
            elif name == "sft":
                path = sft_model(args.sft_dir / f"{args.task}-{args.sft_steps}", args.sft_steps, args.task)
            else:
                path = Path(name)
            start = time.perf_counter()
            runs = measure(path, args.num_envs, args.episodes, args.max_new_tokens, args.repeats, args.task,
                           device=args.device, dtype=args.dtype, min_join=args.min_join)
            same = all(run.answers == runs["in-flight"].answers for run in runs.values())
            print(
                f"\n{label} rollouts, {name} ({path}), {args.device} {args.dtype}, {torch.get_num_threads()} CPU "
                f"thread(s), {args.max_new_tokens} new tokens, temperature 1, {args.num_envs} environments; all modes "
                f"played the same episodes and gave {'the same' if same else 'NOT the same'} answers; "
                f"{time.perf_counter() - start:.0f} s"
            )
            for run in runs.values():
                print(breakdown(run))
            rows += rows_of(runs, f"{label} {name if name in ('tiny', 'small', 'sft') else Path(name).name}")
    print(format_table(rows))


if __name__ == "__main__":
    main()
