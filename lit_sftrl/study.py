"""``lit-sftrl study --config study.yaml``: the paper's question as one command, in one run directory.

    base test (optional) -> Init (an SFT fit, or an existing checkpoint)
        -> RL from Init for ``rl_updates`` updates, once per seed
        -> SFT from Init for as many steps as that seed's RL spent FLOPs beyond Init, at Init's FLOPs per step
           (matched compute), once per seed
        -> tests of Init, SFT and RL on every variant (the test seed's fixed episodes) -> report figures
        -> (optional) the base's skills probe put to the base, Init, SFT and RL

With ``seeds`` N > 1, RL and continued SFT each run N times from the one Init checkpoint, seed s setting
``--seed_everything s`` and the training data's seed (``--data.init_args.seed s``), in folders ``rl_seed<s>`` and
``sft_seed<s>``; ``study.json`` then holds each seed's test score, the mean with its standard error over seeds,
and the verdict on the paper's sign pattern (``results``).

Every stage but the probe is one ``lit-sftrl fit``/``test``/``report`` command, in a subprocess by default (each
stage starts from a clean process, and its CPU time is its own). ``study.json`` in the run directory records
each stage's exact command, wall, CPU and GPU seconds and whether it finished: a study run again with the same
config skips the finished stages and resumes an unfinished fit from its last checkpoint (``--ckpt_path last``).
Validation passes during fits draw their episodes from ``val_seed``; the test episodes (``test_seed``) are only
ever evaluated, never tuned on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_sftrl.core.validation import positive_int, validate

STUDY_RECORD = "study.json"
# Fields that change how a study runs, or add a stage after the others, not what the fits and tests compute:
# a study may resume with them changed (e.g. a probe asked for once the rest has finished).
HOW_NOT_WHAT = ("in_process", "stop_after", "report", "probe")
ARMS = {"Init": "init", "SFT": "sft", "RL": "rl"}  # the report's arm labels and the study's stage names
ENTRY_POINT = "from lit_sftrl.cli import main; main()"  # when the console script is not beside the interpreter


class StageFailed(ValueError):
    """A stage's command failed or was interrupted: the study stops, its record says where to resume."""


@dataclass
class InitConfig:
    """The shared starting point of RL and continued SFT.

    Args:
        steps: SFT steps of the Init fit (``study.sft_config`` plus ``overrides``).
        checkpoint: start from this Lightning checkpoint of an SFT run instead of fitting one. Its FLOPs counter
            and step count give the FLOPs per SFT step that the continued SFT is matched with.
        overrides: command-line overrides of the Init fit only, e.g. ``[--data.init_args.batch_size, "8"]``.
    """

    steps: int = 600
    checkpoint: str | None = None
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        problem = positive_int(self.steps)
        if problem:
            raise ValueError(f"study.init.steps: {problem}")
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise ValueError(f"study.init.checkpoint: {self.checkpoint!r} is not a checkpoint file")


@dataclass
class ProbeConfig:
    """The base's held-out skills questions (``lit_sftrl.pretraining.probe``) put to the base and each model."""

    items: int = 50
    seed: int = 1000

    def __post_init__(self) -> None:
        problem = positive_int(self.items)
        if problem:
            raise ValueError(f"study.probe.items: {problem}")


@dataclass
class StudyConfig:
    """One SFT-vs-RL study (docs/how-to/study.md).

    Args:
        out: the run directory: one folder per stage, ``report/`` and ``study.json``.
        sft_config: the SFT run config (Init, continued SFT, tests of the base, Init and SFT).
        rl_config: the RL run config (RL from Init, its test).
        init: the Init fit, or an existing checkpoint.
        rl_updates: PPO updates from Init (Lightning epochs).
        seeds: runs of RL and of continued SFT from the one Init, seeds 0..N-1 (``--seed_everything`` and
            ``--data.init_args.seed``); 1: one run of each with the configs' own seeds, in ``rl/`` and ``sft/``.
        base: the model every run starts from (``--model.init_args.backbone.path``); default: the configs' own.
        base_test: test the base itself first, before any post-training.
        overrides: command-line overrides given to every stage (e.g. ``[--trainer.accelerator, cpu]``).
        rl_overrides: overrides of the RL fit and test only, e.g. ``[--model.init_args.ppo.kl_coef, "0.05"]``.
        sft_overrides: overrides of the continued SFT fit and test only.
        test_overrides: overrides of every test.
        val_seed: seed of the validation episodes during fits; must differ from ``test_seed``.
        test_seed: seed of the test episodes (the shipped configs' evaluation seed).
        val_episodes: validation episodes per variant during fits (default: the configs').
        test_episodes: test episodes per variant (default: the paper's sizes).
        report: write the report figures (``lit-sftrl report``) at the end.
        probe: put the base's skills probe to the base, Init, SFT and RL (needs ``base``).
        in_process: run each ``lit-sftrl`` command in this process instead of a subprocess (faster start; tests).
        stop_after: stop once this stage has finished (resume later by running the study again without it).
    """

    out: str
    sft_config: str
    rl_config: str
    init: InitConfig = field(default_factory=InitConfig)
    rl_updates: int = 10
    seeds: int = 1
    base: str | None = None
    base_test: bool = False
    overrides: list[str] = field(default_factory=list)
    rl_overrides: list[str] = field(default_factory=list)
    sft_overrides: list[str] = field(default_factory=list)
    test_overrides: list[str] = field(default_factory=list)
    val_seed: int = 4321
    test_seed: int = 1234
    val_episodes: int | None = None
    test_episodes: int | None = None
    report: bool = True
    probe: ProbeConfig | None = None
    in_process: bool = False
    stop_after: str | None = None

    def __post_init__(self) -> None:
        validate(self, "study")
        for key in ("rl_updates", "seeds"):
            problem = positive_int(getattr(self, key))
            if problem:
                raise ValueError(f"study.{key}: {problem}")
        if self.val_seed == self.test_seed:
            raise ValueError(f"study.val_seed {self.val_seed} draws the test episodes: choose another seed for "
                             "validation during fits")
        for key in ("sft_config", "rl_config"):
            if not Path(getattr(self, key)).is_file():
                raise ValueError(f"study.{key}: {getattr(self, key)!r} is not a file")
        if self.base is not None and not Path(self.base).exists():
            raise ValueError(f"study.base: {self.base!r} does not exist")
        if (self.base_test or self.probe) and self.base is None:
            raise ValueError("study.base_test and study.probe test the base: name it in study.base")
        if self.stop_after is not None and self.stop_after not in self.stage_names():
            raise ValueError(f"study.stop_after: {self.stop_after!r} is not a stage of this study; "
                             f"choose one of {self.stage_names()}")

    def seed_suffixes(self) -> list[str]:
        """What each seed adds to its stages' and folders' names: nothing with one seed (the layout of a study
        before seeds existed), ``_seed<s>`` with several."""
        return [""] if self.seeds == 1 else [f"_seed{seed}" for seed in range(self.seeds)]

    def stage_names(self) -> list[str]:
        seeded = lambda stage: [stage + suffix for suffix in self.seed_suffixes()]  # noqa: E731
        return ([*["base_test"] * self.base_test, *["init"] * (self.init.checkpoint is None), *seeded("rl"),
                 *seeded("sft"), "init_test", *seeded("sft_test"), *seeded("rl_test"), *["report"] * self.report,
                 *["probe"] * (self.probe is not None)])


# ----------------------------------------------------------------------------------------------- running


def run_lit_sftrl(args: list[str], in_process: bool) -> None:
    """Run one ``lit-sftrl`` command; an error stops the study (SystemExit or CalledProcessError)."""
    if in_process:
        from lit_sftrl.cli import run

        run(args)
        return
    executable = Path(sys.executable).with_name("lit-sftrl")  # the venv's entry point, whatever PATH says
    prefix = [str(executable)] if executable.exists() else [sys.executable, "-c", ENTRY_POINT]
    subprocess.run([*prefix, *args], check=True)


def _cpu_seconds(in_process: bool) -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF if in_process else resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def inherited_flops(path: str | Path) -> float:
    """The FLOPs counter of the checkpoint ``path`` (imported when needed: the study's parser imports no torch)."""
    from lit_sftrl.models.export import inherited_flops as flops

    return flops(path)


def checkpoint_steps(path: str | Path) -> int:
    """Optimizer steps of the run that wrote the Lightning checkpoint ``path``."""
    from lit_sftrl.models.export import read_lightning_checkpoint

    return int(read_lightning_checkpoint(path, mmap=True)["global_step"])


class Study:
    """A study's stages over one run directory, each recorded in ``study.json`` as it starts and finishes."""

    def __init__(self, config: StudyConfig) -> None:
        self.config = config
        self.out = Path(config.out)
        self.record_path = self.out / STUDY_RECORD
        self.record = self._load_record()

    # -- the record ------------------------------------------------------------------------------------------
    def _what(self) -> dict[str, Any]:
        what = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in HOW_NOT_WHAT}
        if what["seeds"] == 1:  # so that the record of a study made before seeds existed still resumes
            del what["seeds"]
        return what

    def _load_record(self) -> dict[str, Any]:
        if not self.record_path.exists():
            return {"config": self._what(), "stages": {}}
        try:
            record = json.loads(self.record_path.read_text())
        except ValueError as error:
            raise ValueError(f"{self.record_path}: unreadable ({error}); move it away to start the study afresh") \
                from None
        if record.get("config") != self._what():
            raise ValueError(f"{self.record_path} records a study with another config: resume it with that config, "
                             "or choose another study.out")
        return record

    def _save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        temporary = self.record_path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.record, indent=2) + "\n")
        temporary.replace(self.record_path)  # a study killed mid-write keeps the previous record

    def finished(self, name: str) -> bool:
        return bool(self.record["stages"].get(name, {}).get("finished"))

    # -- paths and overrides ---------------------------------------------------------------------------------
    def run_dir(self, name: str) -> Path:
        return self.out / name

    def last_checkpoint(self, name: str) -> Path:
        return self.run_dir(name) / "checkpoints" / "last.ckpt"

    @property
    def init_checkpoint(self) -> Path:
        return Path(self.config.init.checkpoint) if self.config.init.checkpoint else self.last_checkpoint("init")

    def _common(self) -> list[str]:
        base = [] if self.config.base is None else ["--model.init_args.backbone.path", self.config.base]
        return [*base, *self.config.overrides]

    def _validation(self) -> list[str]:
        episodes = self.config.val_episodes
        return ["--data.init_args.evaluation.seed", str(self.config.val_seed),
                *([] if episodes is None else ["--data.init_args.evaluation.val_episodes", str(episodes)])]

    def _test(self) -> list[str]:
        episodes = self.config.test_episodes
        return ["--data.init_args.evaluation.seed", str(self.config.test_seed),
                *([] if episodes is None else ["--data.init_args.evaluation.test_episodes", str(episodes)]),
                *self.config.test_overrides]

    def _fit(self, name: str, config: str, *args: str) -> list[str]:
        """A fit into its stage folder: resumed from its last checkpoint when an earlier attempt left one,
        otherwise started afresh (whatever a killed attempt left there is replaced)."""
        started = name in self.record["stages"]
        resume = ["--ckpt_path", "last"] if started and self.last_checkpoint(name).exists() else ["--overwrite", "true"]
        return ["fit", "--config", config, *self._common(), *self._validation(), *args,
                "--trainer.default_root_dir", str(self.run_dir(name)), *resume]

    def _test_of(self, folder: str, config: str, checkpoint: Path | None, *args: str) -> list[str]:
        ckpt = [] if checkpoint is None else ["--ckpt_path", str(checkpoint)]
        return ["test", "--config", config, *self._common(), *args, *self._test(), *ckpt,
                "--trainer.default_root_dir", str(self.run_dir(folder))]

    # -- stages ------------------------------------------------------------------------------------------------
    def _seeding(self, suffix: str) -> list[str]:
        """A seed's training draws: Lightning's global seed and the training data's (episodes played, SFT
        batches). None with one seed: the configs' own seeds, as before seeds existed."""
        if not suffix:
            return []
        seed = suffix.removeprefix("_seed")
        return ["--seed_everything", seed, "--data.init_args.seed", seed]

    def stage_args(self, name: str) -> list[str]:
        """The ``lit-sftrl`` arguments of stage ``name``, built when it is about to run (the continued SFT's
        steps depend on what RL spent)."""
        c = self.config
        stage, _, seed = name.partition("_seed")
        suffix = f"_seed{seed}" if seed else ""
        if name == "base_test":
            return self._test_of("base_test", c.sft_config, None)
        if name == "init":
            return self._fit("init", c.sft_config, "--trainer.max_steps", str(c.init.steps), *c.init.overrides)
        init = ["--model.init_args.init_from", str(self.init_checkpoint)]
        # The seed's overrides come last: they win over an arm's overrides that name a seed.
        if stage == "rl":
            return self._fit(name, c.rl_config, *init, "--trainer.max_epochs", str(c.rl_updates), *c.rl_overrides,
                             *self._seeding(suffix))
        if stage == "sft":
            steps = self.matched_sft_steps(suffix)
            return self._fit(name, c.sft_config, *init, "--trainer.max_steps", str(steps),
                             "--trainer.val_check_interval", str(max(1, steps // 2)), *c.sft_overrides,
                             *self._seeding(suffix))
        if name == "init_test":
            return self._test_of("init_test", c.sft_config, self.init_checkpoint)
        # A test is beside its fit (the report reads the curve and the test record of one run). Tests draw no
        # training seed: every checkpoint plays the same fixed episodes, sampled per episode and attempt.
        if stage == "sft_test":
            return self._test_of(f"sft{suffix}", c.sft_config, self.last_checkpoint(f"sft{suffix}"),
                                 *c.sft_overrides)
        if stage == "rl_test":
            return self._test_of(f"rl{suffix}", c.rl_config, self.last_checkpoint(f"rl{suffix}"), *c.rl_overrides)
        if name == "report":
            # Each arm's test record: the study matched the compute itself (to within one SFT step).
            seeds = [] if c.seeds == 1 else ["--seeds", str(c.seeds)]
            return ["report", *map(str, self.arm_runs()), "--out", str(self.out / "report"), *seeds, "--tests",
                    "true"]
        raise KeyError(name)

    def arm_runs(self) -> list[Path]:
        """The run folders the report compares: Init's test, then each seed's SFT, then each seed's RL."""
        suffixes = self.config.seed_suffixes()
        return [self.run_dir(folder) for folder in
                ("init_test", *[f"sft{s}" for s in suffixes], *[f"rl{s}" for s in suffixes])]

    def matched_sft_steps(self, suffix: str = "") -> int:
        """As many SFT steps as the same seed's RL FLOPs beyond Init buy at Init's FLOPs per SFT step (at least
        one): each SFT seed is matched to its own RL seed."""
        init_flops = inherited_flops(self.init_checkpoint)
        rl_flops = inherited_flops(self.last_checkpoint(f"rl{suffix}"))
        per_step = init_flops / max(1, checkpoint_steps(self.init_checkpoint))
        steps = max(1, math.floor((rl_flops - init_flops) / per_step)) if per_step > 0 else 1
        self.record.setdefault("flops", {}).update(
            {"init": init_flops, f"rl{suffix}": rl_flops, f"sft_steps{suffix}": steps})
        return steps

    def run(self) -> dict[str, Any]:
        """Run every stage not yet finished, in order; return the record (also in ``study.json``)."""
        start = time.perf_counter()
        for name in self.config.stage_names():
            if self.finished(name):
                print(f"study: {name} finished earlier, skipped", flush=True)
            else:
                self._run_stage(name)
            if name == self.config.stop_after:
                print(f"study: stopped after {name} (study.stop_after); run it again to continue", flush=True)
                break
        self._results()
        print(f"study: {self.out} ({(time.perf_counter() - start) / 60:.1f} min this time)", flush=True)
        return self.record

    def _run_stage(self, name: str) -> None:
        if name == "probe":
            args, command, work = [], f"probe_skills({self.config.base!r}, items={self.config.probe.items})", \
                self._probe
        else:
            args = self.stage_args(name)
            command = shlex.join(["lit-sftrl", *args])
            work = lambda: run_lit_sftrl(args, self.config.in_process)  # noqa: E731
        # Recorded before it runs: a stage found started but unfinished resumes from its last checkpoint.
        self.record["stages"][name] = {"command": command, "finished": False}
        self._save()
        print(f"$ {command}", flush=True)
        try:
            seconds = _timed(work, self.config.in_process)
        except subprocess.CalledProcessError as error:
            raise StageFailed(f"stage {name} failed (exit status {error.returncode}); run the study again to "
                              "resume it") from None
        except SystemExit as error:  # in process: the command's own one-line message
            raise StageFailed(f"stage {name} failed: {error.code}; run the study again to resume it") from None
        except KeyboardInterrupt:
            raise StageFailed(f"stage {name} interrupted; run the study again to resume it") from None
        self.record["stages"][name] = {"command": command, "finished": True, **seconds}
        self._save()
        print(f"  ({seconds['wall_s']:.0f} s, {seconds['cpu_s']:.0f} s of CPU)", flush=True)

    def _results(self) -> None:
        """``results`` in the record, once every test has finished: per arm (Init, SFT, RL) each seed's test
        record, score and CPU seconds (fit and test), the mean with its standard error over seeds, and per
        variant the verdict on the paper's sign pattern (``lit_sftrl.report.comparison``)."""
        from lit_sftrl.report import comparison, load_run

        if not all(self.finished(name) for name in self.config.stage_names() if "test" in name):
            return
        try:
            results = comparison([load_run(path) for path in self.arm_runs()], self.config.seeds, tests=True)
        except ValueError as error:  # the stages finished, so the study did; say why its summary is missing
            print(f"study: no results in {STUDY_RECORD}: {error}", flush=True)
            return
        stages = self.record["stages"]
        for label, arm in results["arms"].items():
            prefix = ARMS[label]
            suffixes = [""] if label == "Init" else self.config.seed_suffixes()
            # The fit Init ran (none when it came as a checkpoint) and each seed's fit and test.
            arm["cpu_s"] = [{"fit": stages.get(prefix + suffix, {}).get("cpu_s"),
                             "test": stages[f"{prefix}_test{suffix}"]["cpu_s"]} for suffix in suffixes]
        self.record["results"] = results
        self._save()
        for variant, verdict in results["verdict"].items():
            if verdict:
                rl, sft = verdict["rl_minus_init"], verdict["init_minus_sft"]
                print(f"study: {variant}: RL - Init {100 * rl['difference']:+.1f} ± {100 * rl['stderr']:.1f}, "
                      f"Init - SFT {100 * sft['difference']:+.1f} ± {100 * sft['stderr']:.1f} points; sign pattern "
                      f"{'found' if verdict['sign_pattern'] else 'not found'} (each gap beyond two standard errors)",
                      flush=True)

    def _probe(self) -> None:
        import tempfile

        from lit_sftrl.models.export import export_checkpoint
        from lit_sftrl.pretraining.probe import probe_skills

        probe = self.config.probe
        models = {"base": Path(self.config.base), "init": self.init_checkpoint,
                  **{f"{arm}{suffix}": self.last_checkpoint(f"{arm}{suffix}")
                     for arm in ("sft", "rl") for suffix in self.config.seed_suffixes()}}
        accuracy = {}
        for name, path in models.items():
            with tempfile.TemporaryDirectory() as tmp:
                directory = path if path.is_dir() else export_checkpoint(path, Path(tmp) / "exported")
                accuracy[name] = probe_skills(directory, probe.items, probe.seed)
        (self.out / "probe").mkdir(parents=True, exist_ok=True)
        record = {"path": self.config.base, "items": probe.items, "seed": probe.seed, "accuracy": accuracy}
        (self.out / "probe" / "probe.json").write_text(json.dumps(record, indent=1) + "\n")


def _timed(work: Callable[[], object], in_process: bool) -> dict[str, float]:
    """Wall, CPU (this process's or its children's) and GPU seconds of ``work``. GPU seconds: wall time times
    the GPUs visible to the stage (what it held, not what it kept busy)."""
    wall, cpu = time.perf_counter(), _cpu_seconds(in_process)
    work()
    wall, cpu = time.perf_counter() - wall, _cpu_seconds(in_process) - cpu
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "gpu_s": round(wall * _visible_gpus(), 1)}


# ----------------------------------------------------------------------------------------------- command


def parse_study_config(config_path_or_args: str | Path | list[str]) -> StudyConfig:
    """A :class:`StudyConfig` from a YAML path, or from command-line arguments (``--config study.yaml`` and any
    ``--key value`` overrides, e.g. ``--rl_updates 2``)."""
    from jsonargparse import ActionConfigFile

    from lit_sftrl.core.validation import install_yaml_limits
    from lit_sftrl.run.cli_errors import ShortErrorParser

    install_yaml_limits()
    args = ["--config", str(config_path_or_args)] if isinstance(config_path_or_args, (str, Path)) \
        else list(config_path_or_args)
    parser = ShortErrorParser(prog="lit-sftrl study", description=__doc__.splitlines()[0], default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="the study's YAML file")
    parser.add_class_arguments(StudyConfig, None, as_positional=False)  # the YAML's keys at its top level
    parsed = parser.instantiate_classes(parser.parse_args(args))
    return StudyConfig(**{key: value for key, value in vars(parsed).items() if key != "config"})


def study(config_path_or_args: str | Path | list[str]) -> dict[str, Any]:
    """``lit-sftrl study``: parse the config, run the stages not yet finished; return the ``study.json`` record."""
    return Study(parse_study_config(config_path_or_args)).run()
