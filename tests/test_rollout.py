"""The batched rollout engine against the environments themselves.

A scripted backbone (answers decided by a hash of the prompt, so they are reproducible) drives real
GeneralPoints and V-IRL environments; every conversation the engine handed to the model is then replayed on a
fresh environment, which must show the very same messages (revision turns included) and give the same
rewards and end flags. A real tiny backbone checks that the stored answer ids and log-probs are what scoring
those ids gives.
"""

from __future__ import annotations

import hashlib
import json
from itertools import count
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lit_sftrl.envs.base import REVISION_PREFIX
from lit_sftrl.models.backbone import Generation, SamplingConfig
from lit_sftrl.rollout import RolloutEngine

SAMPLING = SamplingConfig(temperature=1.0, max_new_tokens=8)



# ----------------------------------------------------------------------------------------------- helpers


def digest(messages, salt: str = "") -> int:
    return int(hashlib.sha256((salt + json.dumps(list(messages))).encode()).hexdigest()[:12], 16)


def state_value(prompt) -> float:
    """The scripted value of a prompt: a pure function of the conversation."""
    return (digest(prompt[0], "value") % 1000) / 1000.0


def same_prompt(a, b) -> bool:
    (messages_a, image_a), (messages_b, image_b) = a, b
    if tuple(messages_a) != tuple(messages_b) or (image_a is None) != (image_b is None):
        return False
    return image_a is None or np.array_equal(image_a, image_b)


class ScriptedBackbone:
    """Stands in for :class:`Backbone`: answers are chosen by a hash of the prompt (expert answer, the
    environment's plausible mistake, or garbage), so identical prompts always get identical answers.

    The answer itself comes from the environment whose current observation is the prompt (an oracle: the
    fake needs the expert's answer); which environment that is is exactly what the replay checks later.
    """

    def __init__(self, envs, good: float, value_head: bool = True) -> None:
        self.config = SimpleNamespace(value_head=value_head)
        self.envs, self.good = envs, good
        self.calls: list[list] = []  # the prompts of each generate call
        self.texts: list[str] = []  # every answer, in generation order
        self.value_calls: list[list] = []

    def _owner(self, prompt):
        for env in self.envs:
            if same_prompt(prompt, _as_prompt(env._observation())):
                return env
        raise AssertionError("the model was given a prompt that no environment is showing")

    def _answer(self, prompt) -> str:
        env = self._owner(prompt)
        roll = digest(prompt[0], "answer") % 1000 / 1000.0
        if roll < self.good:
            return env.expert_answer()
        return env.suboptimal_answer() if roll < (1 + self.good) / 2 else "I do not know."

    def generate(self, prompts, sampling, caches=None):
        self.calls.append(list(prompts))
        generations = []
        for prompt in prompts:
            text = self._answer(prompt)
            self.texts.append(text)
            ids = torch.tensor(list(text.encode()), dtype=torch.long)
            generations.append(
                Generation(
                    prompt_ids=torch.arange(5), answer_ids=ids, text=text,
                    logprobs=-torch.rand(len(ids)), value=state_value(prompt) if self.config.value_head else None,
                    num_tokens=5 + len(ids),
                )
            )
        return generations

    def prompt_values(self, prompts, caches=None):
        assert self.config.value_head
        self.value_calls.append(list(prompts))
        return torch.tensor([state_value(prompt) for prompt in prompts])


def _as_prompt(obs):
    return obs["messages"], obs.get("image")


class ResetLog:
    """Records the seeds an environment is reset with (the environment itself is untouched)."""

    def __init__(self, env) -> None:
        self.seeds: list[int] = []
        reset = env.reset

        def recording_reset(*, seed=None, options=None):
            self.seeds.append(seed)
            return reset(seed=seed, options=options)

        env.reset = recording_reset


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    from lit_sftrl.envs.city import make_city

    folder = tmp_path_factory.mktemp("city") / "metro"
    return make_city(folder, "metro", num_routes=6, seed=3, grid_size=3, pano_width=64)


def make_env(kind: str, city):
    from lit_sftrl.envs.general_points import GeneralPointsEnv
    from lit_sftrl.envs.virl import VIRLEnv

    if kind.startswith("gp"):
        return GeneralPointsEnv(modality="image" if kind == "gp-image" else "text", verify_iter=3, image_size=64)
    return VIRLEnv(str(city), modality="image" if kind == "virl-image" else "text", image_size=64)


# kind -> (share of expert answers, attempts per rollout); V-IRL routes need many right answers in a row to end.
CASES = {"gp-text": (0.4, 27), "gp-image": (0.4, 27), "virl-text": (0.85, 61), "virl-image": (0.85, 61)}


# ----------------------------------------------------------------------------------------------- collect


@pytest.mark.parametrize("kind", list(CASES))
def test_collect_conversations_match_what_each_environment_expects(kind, city):
    good, rollout_steps = CASES[kind]
    num_envs = 4
    envs = [make_env(kind, city) for _ in range(num_envs)]
    logs = [ResetLog(env) for env in envs]
    backbone = ScriptedBackbone(envs, good)
    engine = RolloutEngine(backbone, SAMPLING)
    drawn = count(100)
    attempts, finished = engine.collect(envs, ((next(drawn), {}) for _ in count()), rollout_steps)

    # Exactly rollout_steps attempts, from one batched generation per lockstep step.
    assert len(attempts) == rollout_steps
    steps = [num_envs] * (rollout_steps // num_envs) + [rollout_steps % num_envs]
    assert [len(call) for call in backbone.calls] == steps
    # What the model was given is what each attempt stores, in order, with that generation's outputs.
    given = [prompt for call in backbone.calls for prompt in call]
    assert all(same_prompt(attempt.prompt, prompt) for attempt, prompt in zip(attempts, given, strict=True))
    for attempt, text in zip(attempts, backbone.texts):
        assert attempt.answer_ids.tolist() == list(text.encode())
        assert attempt.value == pytest.approx(state_value(attempt.prompt))
    # Environments are reset in place: each one drew its own seeds, all distinct, none skipped.
    seeds = [seed for log in logs for seed in log.seeds]
    assert sorted(seeds) == list(range(100, 100 + len(seeds)))

    coverage = {"success": 0, "budget": 0, "cut": 0, "revision": 0}
    for index, log in enumerate(logs):
        mine = [(attempt, text) for attempt, text in zip(attempts, backbone.texts) if attempt.env_index == index]
        episodes = split_episodes(mine)
        ended = [replay_episode(kind, city, seed, episode, coverage) for seed, episode in zip(log.seeds, episodes)]
        # One reset per episode: the initial one and one after each episode the environment ended; only the
        # last episode may be cut by the rollout (and then the environment was not reset after it).
        assert all(ended[:-1])
        assert len(log.seeds) == sum(ended) + 1
        assert len(episodes) == len(log.seeds) - (1 if ended[-1] else 0)
    assert len(finished) == sum(1 for log in logs for _ in log.seeds) - num_envs
    assert all(coverage.values()), coverage  # the script exercised every path
    # Bootstraps were computed in one call, for exactly the truncated attempts, from their truncated states.
    truncated = [a for a in attempts if a.truncated]
    assert len(backbone.value_calls) == 1 and len(backbone.value_calls[0]) == len(truncated)


def split_episodes(mine):
    """An environment's attempts, cut into episodes at the end flags; the last one may be cut by the rollout."""
    episodes, current = [], []
    for attempt, text in mine:
        current.append((attempt, text))
        if attempt.terminated or attempt.truncated:
            episodes.append(current)
            current = []
    assert not current, "the rollout's last attempt of an environment must be flagged truncated"
    return episodes


def replay_episode(kind, city, seed, episode, coverage) -> bool:
    """Play the stored answers on a fresh environment: same prompts, rewards and end flags. Returns whether the
    environment itself ended the episode (success or attempt budget) rather than the rollout."""
    env = make_env(kind, city)
    obs, _ = env.reset(seed=seed)
    previous_correct = None
    for k, (attempt, text) in enumerate(episode):
        last = k == len(episode) - 1
        assert same_prompt(attempt.prompt, _as_prompt(obs)), f"seed {seed}, attempt {k}"
        messages = attempt.prompt[0]
        if previous_correct is False:  # after a failed attempt: the answer, then why it failed
            assert messages[-2] == {"role": "assistant", "content": episode[k - 1][1]}
            assert messages[-1]["role"] == "user" and messages[-1]["content"].startswith(REVISION_PREFIX)
            coverage["revision"] += 1
        elif previous_correct is True:  # V-IRL: a right answer moves on to the next rail point, a fresh chat
            assert len(messages) == 1
        else:
            assert len(messages) == 1
        obs, reward, terminated, env_truncated, info = env.step(text)
        assert attempt.reward == reward
        assert attempt.terminated == terminated
        if not last:
            assert not (attempt.terminated or attempt.truncated or terminated or env_truncated)
        elif terminated:
            assert not attempt.truncated and attempt.bootstrap_value == 0.0
            coverage["success"] += 1
        else:
            # Truncated: by the attempt budget (the environment says so) or by the rollout's end (it does not).
            assert attempt.truncated
            coverage["budget" if env_truncated else "cut"] += 1
            # Bootstrapped from the state the episode stopped in (its last answer included), not a new episode.
            assert attempt.bootstrap_value == pytest.approx(state_value(_as_prompt(obs)))
            if not env_truncated:
                assert same_prompt(_as_prompt(obs), _as_prompt(env._observation()))
        if not (terminated or env_truncated):
            previous_correct = bool(info["correct"])
    return terminated or env_truncated


def test_collect_without_value_head_needs_no_bootstrap():
    from lit_sftrl.envs.general_points import GeneralPointsEnv

    envs = [GeneralPointsEnv(verify_iter=2) for _ in range(3)]
    backbone = ScriptedBackbone(envs, good=0.2, value_head=False)
    attempts, _ = RolloutEngine(backbone, SAMPLING).collect(envs, ((s, {}) for s in count()), 10)
    assert len(attempts) == 10 and not backbone.value_calls
    assert all(a.value == 0.0 and a.bootstrap_value == 0.0 for a in attempts)
    for index in range(3):  # every environment's last attempt ends its episode, or is cut by the rollout
        last = [a for a in attempts if a.env_index == index][-1]
        assert last.terminated or last.truncated


def test_collect_fewer_attempts_than_environments():
    from lit_sftrl.envs.general_points import GeneralPointsEnv

    envs = [GeneralPointsEnv() for _ in range(4)]
    backbone = ScriptedBackbone(envs, good=0.0)
    attempts, finished = RolloutEngine(backbone, SAMPLING).collect(envs, ((s, {}) for s in count()), 3)
    assert [a.env_index for a in attempts] == [0, 1, 2] and not finished
    assert all(a.truncated for a in attempts)


# ----------------------------------------------------------------------------------------------- evaluate


def test_evaluate_returns_results_in_episode_order_and_is_reproducible(city):
    from lit_sftrl.envs.general_points import GeneralPointsEnv

    episodes = [(seed, {}) for seed in (5, 17, 3, 99, 42, 8, 61)]

    def run(envs):
        return RolloutEngine(ScriptedBackbone(envs, good=0.35), SAMPLING).evaluate(envs, episodes)

    results = run([GeneralPointsEnv(verify_iter=3) for _ in range(3)])
    # Each episode alone, on its own environment, gives the same result at the same position.
    alone = [
        RolloutEngine(ScriptedBackbone([env], good=0.35), SAMPLING).evaluate([env], [episode])[0]
        for episode, env in ((episode, GeneralPointsEnv(verify_iter=3)) for episode in episodes)
    ]
    assert results == alone
    assert len({(r.success, r.attempts, r.episode_return) for r in results}) > 2  # the order is observable
    assert run([GeneralPointsEnv(verify_iter=3) for _ in range(3)]) == results
    assert run([GeneralPointsEnv(verify_iter=3) for _ in range(10)]) == results  # more envs than episodes


def test_evaluate_virl_routes_in_order(city):
    from lit_sftrl.envs.virl import VIRLEnv

    episodes = [(i, {"route_index": i % 6}) for i in range(6)]
    envs = [VIRLEnv(str(city)) for _ in range(4)]
    results = RolloutEngine(ScriptedBackbone(envs, good=0.9), SAMPLING).evaluate(envs, episodes)
    for episode, result in zip(episodes, results):
        env = VIRLEnv(str(city))
        (expected,) = RolloutEngine(ScriptedBackbone([env], good=0.9), SAMPLING).evaluate([env], [episode])
        assert result == expected


# ----------------------------------------------------------------------------------------------- real model


@pytest.mark.parametrize("modality", ["text", "image"])
def test_stored_answer_ids_and_logprobs_are_what_scoring_gives(modality, tiny_dir_factory):
    from lit_sftrl.envs.general_points import GeneralPointsEnv
    from lit_sftrl.models import Backbone, BackboneConfig

    backbone = Backbone(BackboneConfig(path=str(tiny_dir_factory("mllama")), value_head=True)).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(backbone.value_head.net[-1].weight, std=0.5)  # V = 0 at init would compare nothing
    envs = [GeneralPointsEnv(modality=modality, image_size=64, verify_iter=2) for _ in range(3)]
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=6)
    attempts, _ = RolloutEngine(backbone, sampling).collect(envs, ((s, {}) for s in count()), 7)

    scores = backbone.score([a.prompt for a in attempts], [a.answer_ids for a in attempts], sampling.temperature)
    assert torch.allclose(scores.logprob_sum, torch.tensor([a.logprob for a in attempts]), atol=1e-4)
    assert torch.allclose(scores.values, torch.tensor([a.value for a in attempts]), atol=1e-4)
    assert len({round(a.value, 4) for a in attempts}) > 1
    # The prompt ids are the processor's encoding of the stored prompt.
    for attempt in attempts:
        encoded = backbone.encoder.encode_prompts([attempt.prompt])
        assert torch.equal(attempt.prompt_ids, encoded["input_ids"][0][encoded["attention_mask"][0].bool()])
    # The text the environment judged is the decoding of the stored ids: it reappears in the revision turn.
    revised = 0
    for attempt, following in zip(attempts, attempts[len(envs) :]):
        if following.env_index == attempt.env_index and not (attempt.terminated or attempt.truncated):
            text = backbone.tokenizer.decode(attempt.answer_ids, skip_special_tokens=True)
            assert following.prompt[0][-2] == {"role": "assistant", "content": text}
            revised += 1
    assert revised


def test_attempts_of_one_episode_share_one_image_array():
    """Environments copy the image on every step; the engine keeps one array per unchanged image."""
    from lit_sftrl.rollout import _Running

    image = np.zeros((4, 4, 3), np.uint8)
    state = _Running({"messages": (), "image": image})
    state.continue_with({"messages": (), "image": image.copy()}, None)
    assert state.obs["image"] is image
    changed = image.copy()
    changed[0, 0, 0] = 1
    state.continue_with({"messages": (), "image": changed}, None)
    assert state.obs["image"] is changed
