"""Which episodes the trainers see: expert SFT conversations, the seeded SFT stream, fixed evaluation chunks.

No model is built here: everything is environments, numpy and DataLoaders.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from lit_sftrl.core.seeding import STREAMS, stream_rng, stream_seed
from lit_sftrl.data.datamodules import (
    EvalConfig,
    ExpertSource,
    RLDataModule,
    SFTBatches,
    SFTDataModule,
    expert_conversations,
    keep_as_is,
)
from lit_sftrl.data.tasks import TaskConfig
from lit_sftrl.envs.base import REVISION_PREFIX
from lit_sftrl.envs.city import make_city

GP_SUCCESS_REWARD = 5.0  # GeneralPoints' DEFAULT_REWARDS["success"]
VIRL_CORRECT_REWARD = 1.0  # V-IRL's DEFAULT_REWARDS["correct"]


@pytest.fixture(scope="module")
def cities(tmp_path_factory) -> tuple[str, str]:
    """A small training city (6 routes) and a smaller visual_ood city (3 routes), tiny panoramas."""
    root = tmp_path_factory.mktemp("cities")
    return (
        str(make_city(root / "metro", "metro", 6, seed=0, pano_width=64)),
        str(make_city(root / "harbor", "harbor", 3, seed=0, pano_width=64)),
    )


def virl(cities, name: str = "virl_l", **kwargs) -> TaskConfig:
    return TaskConfig(name=name, routes=cities[0], ood_routes=cities[1], image_size=64, **kwargs)


def replay(env, seed: int, conversations: list[dict]) -> list[tuple[float, bool, bool, dict]]:
    """Step a fresh episode with each conversation's final (assistant) turn; check each was the prompt shown."""
    obs, _ = env.reset(seed=seed)
    steps = []
    for conversation in conversations:
        assert conversation["messages"][:-1] == list(obs["messages"])
        obs, reward, terminated, truncated, info = env.step(conversation["messages"][-1]["content"])
        steps.append((reward, terminated, truncated, info))
    return steps


# ------------------------------------------------------------------------------------- expert conversations


@pytest.mark.parametrize("name", ["gp_l", "gp_vl"])
def test_gp_expert_conversation_ends_with_the_expert_answer_and_solves_the_hand(name):
    env = TaskConfig(name=name, image_size=64).make_env("id")
    for seed in range(3):
        conversations = expert_conversations(env, seed, {}, np.random.default_rng(seed), multi_turn=0.0)
        assert len(conversations) == 1  # the expert solves the hand on its first attempt
        env.reset(seed=seed)
        expected = env.expert_answer()
        messages = conversations[0]["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert messages[-1]["content"] == expected
        assert (conversations[0]["image"] is not None) == (name == "gp_vl")
        [(reward, terminated, truncated, info)] = replay(env, seed, conversations)
        assert reward == GP_SUCCESS_REWARD and terminated and not truncated and info["success"]


@pytest.mark.parametrize("name", ["virl_l", "virl_vl"])
def test_virl_expert_conversations_walk_the_whole_route_correctly(cities, name):
    env = virl(cities, name).make_env("id")
    conversations = expert_conversations(env, 3, {}, np.random.default_rng(0), multi_turn=0.0)
    assert len(conversations) > 1  # one conversation per rail point
    assert all(c["messages"][-1]["role"] == "assistant" for c in conversations)
    steps = replay(env, 3, conversations)
    assert all(reward == VIRL_CORRECT_REWARD for reward, *_ in steps)
    assert [terminated for _, terminated, _, _ in steps] == [False] * (len(steps) - 1) + [True]
    assert steps[-1][3]["success"] and not any(truncated for _, _, truncated, _ in steps)


@pytest.mark.parametrize("name", ["gp_l", "virl_l"])
def test_multi_turn_one_holds_a_wrong_answer_the_feedback_and_the_correction(cities, name):
    task = virl(cities, name, verify_iter=2) if name == "virl_l" else TaskConfig(name=name, verify_iter=2)
    env = task.make_env("id")
    conversations = expert_conversations(env, 5, {}, np.random.default_rng(0), multi_turn=1.0)
    assert conversations
    for conversation in conversations:
        roles = [m["role"] for m in conversation["messages"]]
        assert roles == ["user", "assistant", "user", "assistant"]
        wrong, feedback, correction = (m["content"] for m in conversation["messages"][1:])
        assert feedback.startswith(REVISION_PREFIX)
        assert wrong != correction
    # The corrections are the expert's: replaying (wrong answer, then correction) per prompt succeeds.
    obs, _ = env.reset(seed=5)
    for conversation in conversations:
        wrong = conversation["messages"][1]["content"]
        obs, reward, *_ = env.step(wrong)
        assert reward < 0
        assert list(obs["messages"]) == conversation["messages"][:-1]
        obs, reward, terminated, truncated, info = env.step(conversation["messages"][-1]["content"])
        assert reward > 0
    assert terminated and info["success"]


def test_multi_turn_must_be_a_probability():
    with pytest.raises(ValueError, match="multi_turn"):
        SFTDataModule(multi_turn=1.5)


# ------------------------------------------------------------------------------------- the SFT stream


def batches(dataset, n: int, num_workers: int = 0) -> list[list[dict]]:
    loader = DataLoader(dataset, batch_size=None, collate_fn=keep_as_is, num_workers=num_workers)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out
    raise AssertionError("the stream ended")


def fingerprint(batch: list[dict]) -> list:
    return [
        (json.dumps(sample["messages"]), None if sample["image"] is None else sample["image"].tobytes())
        for sample in batch
    ]


@pytest.fixture(scope="module")
def gp_source() -> ExpertSource:
    return ExpertSource(TaskConfig(name="gp_l"), multi_turn=0.0)


def test_a_batch_is_a_pure_function_of_seed_rank_and_index(gp_source):
    first = [fingerprint(b) for b in batches(SFTBatches(gp_source, 3, seed=7, rank=1, start=0), 4)]
    fresh = ExpertSource(TaskConfig(name="gp_l"), multi_turn=0.0)
    again = [fingerprint(b) for b in batches(SFTBatches(fresh, 3, seed=7, rank=1, start=0), 4)]
    assert first == again
    assert len({json.dumps(f) for f in first}) == 4  # consecutive batches differ
    direct = gp_source.batch(stream_rng("sft_batches", 7, 1, 2), 3)
    assert fingerprint(direct) == first[2]


def test_ranks_and_seeds_draw_different_episodes(gp_source):
    rank0 = [fingerprint(b) for b in batches(SFTBatches(gp_source, 3, seed=0, rank=0, start=0), 3)]
    rank1 = [fingerprint(b) for b in batches(SFTBatches(gp_source, 3, seed=0, rank=1, start=0), 3)]
    seed1 = [fingerprint(b) for b in batches(SFTBatches(gp_source, 3, seed=1, rank=0, start=0), 3)]
    prompts = lambda stream: {sample[0] for batch in stream for sample in batch}  # noqa: E731
    assert prompts(rank0).isdisjoint(prompts(rank1))
    assert prompts(rank0).isdisjoint(prompts(seed1))


def test_two_workers_split_the_stream_and_return_it_in_order(gp_source):
    dataset = SFTBatches(gp_source, 2, seed=3, rank=0, start=0)
    serial = [fingerprint(b) for b in batches(dataset, 6)]
    parallel = [fingerprint(b) for b in batches(dataset, 6, num_workers=2)]
    assert parallel == serial
    # Workers took alternate batches (0 the even ones, 1 the odd ones), which differ from each other.
    assert len({json.dumps(b) for b in parallel}) == 6


def test_a_start_offset_resumes_the_stream_exactly(gp_source):
    whole = [fingerprint(b) for b in batches(SFTBatches(gp_source, 2, seed=3, rank=0, start=0), 5)]
    resumed = [fingerprint(b) for b in batches(SFTBatches(gp_source, 2, seed=3, rank=0, start=3), 2)]
    assert resumed == whole[3:5]
    # The datamodule starts its loader where the checkpoint says.
    datamodule = SFTDataModule(task=TaskConfig(name="gp_l"), batch_size=2, seed=3)
    datamodule.load_state_dict({"batches_consumed": 3})
    assert [fingerprint(b) for b in batches(datamodule.train_dataloader().dataset, 2)] == whole[3:5]


def test_virl_samples_come_from_every_rail_point(cities):
    source = ExpertSource(virl(cities, "virl_vl"), multi_turn=0.0)
    batch = source.batch(stream_rng("sft_batches", 0, 0, 0), 4)
    assert len(batch) == 4 and all(sample["image"].shape == (64, 64, 3) for sample in batch)
    assert all(sample["messages"][-1]["role"] == "assistant" for sample in batch)


def test_llava_json_feeds_the_sft_datamodule(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0)]):
        Image.new("RGB", (16, 12), colour).save(images / f"{i}.png")
    entries = [
        {"image": f"{i}.png", "conversations": [{"from": "human", "value": f"<image>\nWhat colour is {i}?"},
                                                 {"from": "gpt", "value": f'{{"colour": {i}}}'}]}
        for i in range(2)
    ]
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(entries))
    datamodule = SFTDataModule(llava_json=str(path), image_folder=str(images), batch_size=3, seed=0)
    loader = datamodule.train_dataloader()
    drawn = batches(loader.dataset, 4)
    seen = set()
    for batch in drawn:
        assert len(batch) == 3
        for sample in batch:
            i = int(sample["messages"][0]["content"][-2])
            seen.add(i)
            assert sample["messages"] == [
                {"role": "user", "content": f"What colour is {i}?"},
                {"role": "assistant", "content": f'{{"colour": {i}}}'},
            ]
            assert sample["image"].shape == (12, 16, 3) and sample["image"][0, 0, i] == 255
    assert seen == {0, 1}
    assert [fingerprint(b) for b in batches(loader.dataset, 4)] == [fingerprint(b) for b in drawn]  # seeded


# ------------------------------------------------------------------------------------- evaluation episodes


def test_eval_chunks_are_fixed_across_calls_and_instances():
    config = EvalConfig(val_episodes=5, chunk=2, seed=11)
    a = SFTDataModule(task=TaskConfig(name="gp_l"), evaluation=config, seed=0)
    b = SFTDataModule(task=TaskConfig(name="gp_l"), evaluation=EvalConfig(val_episodes=5, chunk=2, seed=11), seed=99)
    first = a.eval_chunks("id", 5)
    assert [len(c.episodes) for c in first] == [2, 2, 1]
    assert first == a.eval_chunks("id", 5) == b.eval_chunks("id", 5)
    # The training seed does not move them; the evaluation seed and the variant do.
    other = SFTDataModule(task=TaskConfig(name="gp_l"), evaluation=EvalConfig(chunk=2, seed=12))
    assert [e for c in other.eval_chunks("id", 5) for e in c.episodes] != [e for c in first for e in c.episodes]
    ood = a.eval_chunks("rule_ood", 5)
    assert [e[0] for c in ood for e in c.episodes] != [e[0] for c in first for e in c.episodes]
    assert ood[0].env_kwargs["face_card_rule"] == "11-13" and first[0].env_kwargs["face_card_rule"] == "10"
    # Validation and test share the episodes' prefix: the first val episodes are the first test episodes.
    loaders = a.val_dataloader()
    assert [c.variant for loader in loaders for c in loader] == ["id"] * 3 + ["rule_ood"] * 3
    assert list(loaders[0]) == first


def test_virl_evaluation_plays_route_i_and_every_route_at_most_once(cities):
    datamodule = SFTDataModule(task=virl(cities, "virl_vl"), evaluation=EvalConfig(val_episodes=5, chunk=2))
    for variant in ("id", "rule_ood"):
        episodes = [e for c in datamodule.eval_chunks(variant, 5) for e in c.episodes]
        assert [options for _, options in episodes] == [{"route_index": i} for i in range(5)]
    # The visual_ood city has 3 routes: asking for 5 evaluates each of them once instead of failing at route 3.
    ood = datamodule.eval_chunks("visual_ood", 5)
    assert [options for c in ood for _, options in c.episodes] == [{"route_index": i} for i in range(3)]
    assert ood[0].env_kwargs["routes"] == cities[1]
    assert datamodule.num_test_episodes("visual_ood") == 3
    env = virl(cities, "virl_vl").make_env("visual_ood")
    for chunk in ood:
        for seed, options in chunk.episodes:
            env.reset(seed=seed, options=options)
            assert env.route.index == options["route_index"]


def test_ranks_share_the_evaluation_chunks_without_repeats():
    datamodule = SFTDataModule(task=TaskConfig(name="gp_l"), evaluation=EvalConfig(chunk=2))
    chunks = datamodule.eval_chunks("id", 7)  # 4 chunks
    for world_size in (1, 2, 3):
        shares = [datamodule.rank_chunks("id", 7, rank, world_size) for rank in range(world_size)]
        played = sorted(e for share in shares for c in share for e in c.episodes)
        assert played == sorted(e for c in chunks for e in c.episodes)  # each episode exactly once
    # More ranks than chunks: the spare rank gets an empty chunk (it still updates and syncs its metrics).
    spare = datamodule.rank_chunks("id", 2, 1, 2)
    assert len(spare) == 1 and spare[0].episodes == [] and spare[0].variant == "id"


def test_eval_loaders_keep_lightning_from_padding_ranks_with_repeated_chunks():
    """What a 3-rank Lightning trainer does to the loaders: ours come back untouched, every chunk once; a plain
    loader gets a sampler that shards it (and pads ranks with repeats when the count does not divide)."""
    import lightning as L
    from lightning.pytorch.trainer.states import RunningStage

    trainer = L.Trainer(accelerator="cpu", devices=3, strategy="ddp", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)
    prepare = trainer._data_connector._prepare_dataloader
    datamodule = SFTDataModule(task=TaskConfig(name="gp_l"), evaluation=EvalConfig(val_episodes=6, chunk=2))
    for loader in datamodule.val_dataloader() + datamodule.test_dataloader():
        prepared = prepare(loader, shuffle=False, mode=RunningStage.VALIDATING)
        assert list(prepared) == [loader.dataset[i] for i in range(len(loader.dataset))]
    plain = DataLoader(list(range(4)), batch_size=None)
    assert list(prepare(plain, shuffle=False, mode=RunningStage.VALIDATING)) == [0, 3]  # rank 0 of 3: sharded


def test_paper_test_sizes_by_default():
    datamodule = SFTDataModule(task=TaskConfig(name="gp_vl"))
    assert {v: datamodule.num_test_episodes(v) for v in datamodule.eval_variants} == {
        "id": 234, "rule_ood": 234, "visual_ood": 234
    }
    assert SFTDataModule(evaluation=EvalConfig(test_episodes=5)).num_test_episodes("id") == 5


def test_visual_ood_on_a_text_task_is_refused():
    with pytest.raises(ValueError, match="visual_ood.*gp_l"):
        SFTDataModule(task=TaskConfig(name="gp_l"), evaluation=EvalConfig(variants=["visual_ood"]))
    with pytest.raises(ValueError, match="visual_ood.*virl_l"):
        RLDataModule(task=TaskConfig(name="virl_l"), variant="visual_ood")
    assert SFTDataModule(
        task=TaskConfig(name="gp_vl"), evaluation=EvalConfig(variants=["visual_ood"])
    ).eval_variants == ["visual_ood"]


def test_rl_datamodule_gives_each_rank_its_rollout_spec():
    datamodule = RLDataModule(task=TaskConfig(name="gp_l"), variant="rule_ood", num_envs=3, rollout_steps=9, seed=4)
    [spec] = list(datamodule.train_dataloader())
    assert (spec.num_envs, spec.rollout_steps, spec.seed, spec.rank) == (3, 9, 4, 0)
    assert spec.env_kwargs["face_card_rule"] == "11-13"


@pytest.mark.parametrize("seed, eval_seed", [(0, 0), (1234, 1234), (0, 1234), (-3, 3), (5, 0)])
def test_training_episodes_never_repeat_evaluation_episodes(seed, eval_seed):
    """Whatever the configured seeds (equal, zero, negative), the streams that name training episodes (SFT batches,
    PPO episodes) never name an evaluation episode, and no two streams share their draws."""
    datamodule = SFTDataModule(task=TaskConfig(name="gp_l"), evaluation=EvalConfig(seed=eval_seed), seed=seed)
    evaluation = {episode for variant in ("id", "rule_ood") for chunk in datamodule.eval_chunks(variant, 64)
                  for episode, _ in chunk.episodes}
    ppo = {stream_seed("ppo_episodes", seed, rank, env, n) for rank in range(2) for env in range(16) for n in range(8)}
    assert len(evaluation) == 128 and len(ppo) == 256
    assert not evaluation & ppo
    # Before streams had names, SFT batch i and evaluation episode i came from one draw when the seeds were equal.
    first_draws = {stream: stream_rng(stream, seed, 0, 0).integers(2**62) for stream in STREAMS}
    assert len(set(first_draws.values())) == len(STREAMS)


def test_streams_reject_unknown_names():
    with pytest.raises(ValueError, match="unknown random stream"):
        stream_rng("training", 0)
