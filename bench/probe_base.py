"""What a base model knows before post-training: greedy accuracy on held-out skills-corpus questions.

    python -m bench.probe_base checkpoints/tiny-mllama-base --init --out docs/base

Each skill gets ``--items`` questions drawn with a seed the pretraining corpus never used (item ``i`` of a
corpus is a pure function of its seed and ``i``). Arithmetic counts any expression that uses exactly the given
numbers and makes the target; the other skills need the exact answer. ``--init`` also probes the same seed's
untrained tiny model (same tokenizer, the base's starting weights), for the chance level. ``--after NAME=CKPT``
(repeatable) also probes a post-trained model of the base (a run's Lightning checkpoint, exported on the fly, or
an exported directory): what SFT or RL kept of the base's skills,

    python -m bench.probe_base checkpoints/tiny-mllama-base --after init=checkpoints/study/init/checkpoints/last.ckpt \
        --after sft=checkpoints/study/sft/checkpoints/last.ckpt --after rl=checkpoints/study/rl/checkpoints/last.ckpt

With ``--out`` it writes ``probe.json`` and, from the base's ``pretrain_metrics.csv``, ``pretrain_loss.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

from lit_sftrl.pretraining.pretrain import RECORD  # noqa: E402
from lit_sftrl.pretraining.probe import probe_skills  # noqa: E402


def _loss_plot(metrics: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in csv.DictReader(metrics.open()) if row.get("train/loss")]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([int(r["step"]) + 1 for r in rows], [float(r["train/loss"]) for r in rows])
    ax.set(xlabel="optimizer step", ylabel="answer-token cross-entropy", yscale="log", title="skills pretraining")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def _as_model_directory(path: Path, tmp: Path) -> Path:
    """A Hugging Face directory of ``path``: itself, or its Lightning checkpoint exported under ``tmp``."""
    if path.is_dir():
        return path
    from lit_sftrl.models.export import export_checkpoint

    return export_checkpoint(path, tmp / "exported")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="base model directory")
    parser.add_argument("--items", type=int, default=100, help="questions per skill")
    parser.add_argument("--seed", type=int, default=1000, help="corpus seed of the questions (not the training one)")
    parser.add_argument("--init", action="store_true", help="also probe the untrained tiny model of the same seed")
    parser.add_argument("--after", action="append", default=[], metavar="NAME=CKPT",
                        help="also probe a post-trained model of this base (Lightning checkpoint or exported folder)")
    parser.add_argument("--out", type=Path, help="folder for probe.json and pretrain_loss.png")
    args = parser.parse_args(argv)
    after = [spec.partition("=")[::2] for spec in args.after]
    for name, path in after:
        if not name or not Path(path).exists():
            parser.error(f"--after wants NAME=CKPT with an existing checkpoint or folder, got {name}={path}")

    start = time.perf_counter()
    results = {"base": probe_skills(args.path, args.items, args.seed)}
    if args.init:
        from lit_sftrl.pretraining.corpus import build_tiny

        record = json.loads((args.path / RECORD).read_text())["config"]
        with tempfile.TemporaryDirectory() as tmp:
            init = build_tiny(Path(tmp) / "init", record["family"], record["size"], record["seed"])
            results["init"] = probe_skills(init, args.items, args.seed)
    for name, path in after:
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = probe_skills(_as_model_directory(Path(path), Path(tmp)), args.items, args.seed)
    skills = list(results["base"])
    width = max(len(name) for name in results)
    print(f"{'model':<{width}} " + " ".join(f"{s:>12}" for s in skills))
    for name, scores in results.items():
        print(f"{name:<{width}} " + " ".join(f"{scores[s]:>12.2f}" for s in skills))
    print(f"({time.perf_counter() - start:.0f} s, {args.items} held-out questions per skill, seed {args.seed})")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"path": str(args.path), "items": args.items, "seed": args.seed, "accuracy": results}
        (args.out / "probe.json").write_text(json.dumps(record, indent=1) + "\n")
        if (args.path / "pretrain_metrics.csv").exists():
            _loss_plot(args.path / "pretrain_metrics.csv", args.out / "pretrain_loss.png")


if __name__ == "__main__":
    main()
