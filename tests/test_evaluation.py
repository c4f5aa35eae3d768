"""Evaluation metrics and their standard errors, repeatable evaluations, and FLOPs on a hand-counted batch."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import yaml

from lit_sftrl.core.compute import FlopsCounter
from lit_sftrl.data.datamodules import EvalConfig, ExpertSource, SFTBatches, SFTDataModule
from lit_sftrl.data.tasks import TaskConfig, make_env_from_spec
from lit_sftrl.training.evaluation import EpisodeMetrics, binomial_stderr, summary_line, write_results
from lit_sftrl.training.rollout import EpisodeResult, RolloutEngine

REPO = Path(__file__).resolve().parents[1]



# ------------------------------------------------------------------------------------- metrics


def result(success, attempts, correct, well_formed, recognized=None) -> EpisodeResult:
    return EpisodeResult(success, attempts, correct, well_formed, episode_return=0.0, recognized=recognized)


HAND_MADE = [
    result(True, 1, 1, 1, recognized=True),
    result(False, 3, 1, 2, recognized=False),
    result(True, 1, 1, 1, recognized=None),  # not judged (e.g. a text task)
    result(False, 5, 0, 5, recognized=True),
]


def test_episode_metrics_give_rates_and_binomial_standard_errors():
    metric = EpisodeMetrics()
    metric.update(HAND_MADE)
    m = metric.compute()
    assert m["episodes"] == 4 and m["attempts"] == pytest.approx(10 / 4)
    expected = {
        "success": (2 / 4, 4),  # episodes solved / episodes
        "per_step_accuracy": (3 / 10, 10),  # correct attempts / attempts
        "well_formed": (9 / 10, 10),  # parsed answers / attempts
        "recognition": (2 / 3, 3),  # first attempts with the cards read right / judged episodes
    }
    for name, (p, n) in expected.items():
        assert m[name] == pytest.approx(p)
        assert m[f"{name}_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / n))
    assert m["success_stderr"] == pytest.approx(0.25)
    line = summary_line("val", 7, {"id": m})
    assert line.startswith("[val @ step 7] id: success 0.500±0.250") and "recognition 0.667" in line


def test_episode_metrics_sum_over_updates_and_ranks_and_reset():
    whole = EpisodeMetrics()
    whole.update(HAND_MADE)
    rank0, rank1 = EpisodeMetrics(), EpisodeMetrics()
    rank0.update(HAND_MADE[:1])
    rank0.update(HAND_MADE[1:2])
    rank1.update(HAND_MADE[2:])
    rank1.update([])  # a rank with an empty evaluation chunk
    rank0.merge_state(rank1)  # what the cross-rank sum ("dist_reduce_fx=sum") amounts to
    assert rank0.compute() == whole.compute()
    whole.reset()
    whole.update(HAND_MADE[2:3])
    m = whole.compute()
    assert (m["success"], m["success_stderr"], m["episodes"]) == (1.0, 0.0, 1.0)
    assert "recognition" not in m  # nothing judged: no recognition rate (not a 0)


def test_degenerate_rates():
    assert binomial_stderr(0.0, 10) == binomial_stderr(1.0, 10) == binomial_stderr(0.5, 0) == 0.0
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert EpisodeMetrics().compute()["success"] == 0.0  # no episode: zeros, not a division error


def test_results_are_written_as_json(tmp_path):
    path = tmp_path / "eval" / "val-step0000003.json"
    record = {"step": 3, "flops": 1.5e12, "metrics": {"id": {"success": 0.25}}}
    write_results(path, record)
    assert json.loads(path.read_text()) == record
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


# ------------------------------------------------------------------------------------- repeatable evaluation


@pytest.fixture(scope="module")
def tiny(tiny_dir_factory) -> Path:
    return tiny_dir_factory("mllama")


@pytest.fixture(scope="module")
def backbone(tiny):
    from lit_sftrl.models.backbone import Backbone, BackboneConfig

    return Backbone(BackboneConfig(path=str(tiny)))


class Transcript:
    """Wraps an environment and records every (reset seed, options) and every answer it is given."""

    def __init__(self, env, log: list) -> None:
        self.env, self.log = env, log

    def reset(self, *, seed=None, options=None):
        self.log.append(("reset", seed, options))
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        self.log.append(("step", action))
        return self.env.step(action)


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (0.6, 0.9)], ids=["greedy", "sampled"])
def test_two_evaluations_play_identical_episodes(backbone, temperature, top_p):
    """Greedy, or sampled as the original evaluator did (temperature 0.6, top-p 0.9): sampling is seeded per
    episode and attempt, so the same episodes come out whatever else shares the batch."""
    from lit_sftrl.models.backbone import SamplingConfig

    datamodule = SFTDataModule(task=TaskConfig(name="gp_vl", verify_iter=2), evaluation=EvalConfig(chunk=3, seed=5))
    [chunk] = datamodule.eval_chunks("id", 3)
    engine = RolloutEngine(backbone, SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=12))
    logs: list[list] = [[], [], []]
    envs = [make_env_from_spec(chunk.env_id, chunk.env_kwargs) for _ in range(2)]  # fewer envs than episodes
    first = engine.evaluate([Transcript(env, logs[0]) for env in envs], chunk.episodes)
    # Again on the same (now used) environments, and on fresh ones built from a fresh datamodule's chunk.
    second = engine.evaluate([Transcript(env, logs[1]) for env in envs], chunk.episodes)
    [again] = SFTDataModule(
        task=TaskConfig(name="gp_vl", verify_iter=2), evaluation=EvalConfig(chunk=3, seed=5)
    ).eval_chunks("id", 3)
    fresh = [make_env_from_spec(again.env_id, again.env_kwargs) for _ in range(3)]
    third = engine.evaluate([Transcript(env, logs[2]) for env in fresh], again.episodes)
    assert first == second == third and len(first) == 3
    answers = [[entry for entry in log if entry[0] == "step"] for log in logs]
    assert answers[0] == answers[1] and len(answers[0]) == sum(r.attempts for r in first)
    assert sorted(answers[2]) == sorted(answers[0])  # three environments interleave the same answers differently
    assert sorted(entry[1:] for entry in logs[0] if entry[0] == "reset") == sorted(
        (s, o or None) for s, o in chunk.episodes
    )
    metrics = []
    for results in (first, second, third):
        metric = EpisodeMetrics()
        metric.update(results)
        metrics.append(metric.compute())
    assert metrics[0] == metrics[1] == metrics[2] and "recognition" in metrics[0]


# ------------------------------------------------------------------------------------- via the command line


def small_vl_config(tmp: Path, tiny: Path, steps: int = 1) -> Path:
    """configs/gp_vl_sft.yaml, shrunk to one step of batch 2 and a 3-episode evaluation with short answers."""
    config = copy.deepcopy(yaml.safe_load((REPO / "configs/gp_vl_sft.yaml").read_text()))
    trainer = config["trainer"]
    trainer.update(accelerator="cpu", max_steps=steps, log_every_n_steps=1, default_root_dir=str(tmp),
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer["logger"]["init_args"]["save_dir"] = str(tmp)
    trainer["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}
    ]
    model = config["model"]["init_args"]
    model["backbone"]["path"] = str(tiny)
    model["eval_sampling"]["max_new_tokens"] = 8
    data = config["data"]["init_args"]
    data["batch_size"] = 2
    data["task"]["verify_iter"] = 1
    data["evaluation"] = {"val_episodes": 3, "chunk": 2, "seed": 1234, "variants": ["id", "visual_ood"]}
    path = tmp.parent / f"{tmp.name}.yaml"  # beside the run directory, which the logger wants empty
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def one_step(tmp_path_factory, tiny):
    from lit_sftrl.cli import run

    run_dir = tmp_path_factory.mktemp("one_step") / "run"
    return run(["fit", "--config", str(small_vl_config(run_dir, tiny))]), run_dir


def hand_counted_tokens(backbone, conversation: dict) -> int:
    """Text tokens of the rendered chat, counted with the bare tokenizer, plus the image's vision tokens derived
    from the vision config: tiles x (patches per tile + the class token)."""
    messages = [
        {
            "role": m["role"],
            "content": ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": m["content"]}],
        }
        for i, m in enumerate(conversation["messages"])
    ]
    text = backbone.processor.apply_chat_template(messages, tokenize=False)
    text_tokens = len(backbone.tokenizer(text, add_special_tokens=False)["input_ids"])
    vision = backbone.model.config.vision_config
    height, width = conversation["image"].shape[:2]
    assert height == width == vision.image_size  # one tile per image (a 224 px card table, 224 px tiles)
    tiles = math.ceil(height / vision.image_size) * math.ceil(width / vision.image_size)
    patches = (vision.image_size // vision.patch_size) ** 2
    return text_tokens + tiles * (patches + 1)


def test_sft_flops_are_6nd_on_a_hand_counted_batch(one_step, backbone):
    cli, _ = one_step
    assert cli.trainer.global_step == 1
    # The batch of that step: the stream is a pure function of (seed, rank, index).
    task = TaskConfig(name="gp_vl", verify_iter=1, image_size=224)
    batch = next(iter(SFTBatches(ExpertSource(task, multi_turn=0.0), 2, seed=0, rank=0, start=0)))
    assert all(sample["image"] is not None for sample in batch)
    tokens = sum(hand_counted_tokens(backbone, sample) for sample in batch)
    n = sum(p.numel() for p in cli.model.backbone.parameters())  # full fine-tuning, untied weights: every parameter
    assert cli.model.backbone.num_parameters == n
    flops = cli.model.flops
    assert flops.train_tokens == cli.model.tokens_seen == tokens
    assert flops.inference_tokens == 0 and flops.initial == 0
    assert flops.total == 6 * n * tokens


def test_generation_flops_are_2nd_on_a_hand_counted_prompt(backbone):
    from lit_sftrl.models.backbone import SamplingConfig

    env = TaskConfig(name="gp_vl", image_size=224).make_env("id")
    obs, _ = env.reset(seed=3)
    [generation] = backbone.generate(
        [(list(obs["messages"]), obs["image"])], SamplingConfig(temperature=0.0, max_new_tokens=6)
    )
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": obs["messages"][0]["content"]}]}
    ]
    prompt_text = backbone.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_tokens = len(backbone.tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    vision = backbone.model.config.vision_config
    tokens = prompt_tokens + (vision.image_size // vision.patch_size) ** 2 + 1 + len(generation.answer_ids)
    assert generation.num_tokens == tokens
    counter = FlopsCounter(backbone.num_parameters)
    counter.add_inference(generation.num_tokens)
    assert counter.total == 2 * backbone.num_parameters * tokens


def test_validating_a_checkpoint_twice_gives_identical_episodes_and_records(one_step, tmp_path, tiny, monkeypatch):
    from lit_sftrl.cli import run
    from lit_sftrl.training import policy

    _, run_dir = one_step
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    played: list[list] = []
    evaluate = policy.RolloutEngine.evaluate

    def recording(self, envs, episodes, **kwargs):
        results = evaluate(self, envs, episodes, **kwargs)
        played[-1].append((list(episodes), results))
        return results

    monkeypatch.setattr(policy.RolloutEngine, "evaluate", recording)
    records = []
    for attempt in range(2):
        played.append([])
        out = tmp_path / f"validate{attempt}"
        run(["validate", "--config", str(small_vl_config(out, tiny)), "--trainer.limit_val_batches", "null",
             "--ckpt_path", str(checkpoint)])
        [path] = (out / "eval").glob("*.json")
        records.append(json.loads(path.read_text()))
    assert played[0] == played[1]
    assert [len(episodes) for episodes, _ in played[0]] == [2, 1, 2, 1]  # id and visual_ood, chunks of 2
    first, second = records
    assert first["metrics"] == second["metrics"] and first["flops"] == second["flops"] > 0
    assert first["step"] == second["step"] == 1 and first["stage"] == "val"
    assert set(first["metrics"]) == {"id", "visual_ood"} and first["metrics"]["id"]["episodes"] == 3
    assert "recognition" in first["metrics"]["visual_ood"]
