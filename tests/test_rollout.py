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
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lit_sftrl.envs.base import REVISION_PREFIX
from lit_sftrl.models.backbone import Generation, SamplingConfig
from lit_sftrl.training.ppo import answer_logprob
from lit_sftrl.training.rollout import EnvironmentPool, RolloutEngine

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

    def generate(self, prompts, sampling, caches=None, seeds=None):
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


def episode_for(env_index: int, number: int):
    return 1000 * env_index + number, {}


def seed_for(env_index: int, k: int) -> int:
    return 0


@pytest.mark.parametrize("kind", list(CASES))
def test_collect_conversations_match_what_each_environment_expects(kind, city):
    good, rollout_steps = CASES[kind]
    num_envs = 4
    envs = [make_env(kind, city) for _ in range(num_envs)]
    logs = [ResetLog(env) for env in envs]
    backbone = ScriptedBackbone(envs, good)
    engine = RolloutEngine(backbone, SAMPLING)
    pool = EnvironmentPool(envs, episode_for)
    rollouts = [engine.collect(pool, rollout_steps, seed_for) for _ in range(3)]

    for rollout in rollouts:  # exactly rollout_steps attempts, from one batched generation per lockstep step
        assert len(rollout.attempts) == rollout_steps
    steps = ([num_envs] * (rollout_steps // num_envs) + [rollout_steps % num_envs]) * 3
    assert [len(call) for call in backbone.calls] == [n for n in steps if n]
    attempts = [attempt for rollout in rollouts for attempt in rollout.attempts]
    # What the model was given is what each attempt stores, in order, with that generation's outputs.
    given = [prompt for call in backbone.calls for prompt in call]
    assert all(same_prompt(attempt.prompt, prompt) for attempt, prompt in zip(attempts, given, strict=True))
    for attempt, text in zip(attempts, backbone.texts):
        assert attempt.answer_ids.tolist() == list(text.encode())
        assert attempt.value == pytest.approx(state_value(attempt.prompt))
    # Each environment plays its own episodes in order (the pool names them), none skipped or restarted.
    for index, log in enumerate(logs):
        assert log.seeds == [1000 * index + n for n in range(len(log.seeds))]

    coverage = {"success": 0, "budget": 0, "cut": 0, "revision": 0, "carried": 0}
    for index, log in enumerate(logs):
        mine = [(attempt, text) for attempt, text in zip(attempts, backbone.texts) if attempt.env_index == index]
        episodes = split_episodes(mine)
        # One reset per episode; the newest may not have played yet (its predecessor ended on the last step).
        assert len(episodes) + mine[-1][0].terminated == len(log.seeds)
        for seed, episode in zip(log.seeds, episodes):
            replay_episode(kind, city, seed, episode, coverage)
    finished = sum(len(rollout.finished) for rollout in rollouts)
    assert finished == sum(len(log.seeds) for log in logs) - num_envs
    assert all(coverage.values()), coverage  # the script exercised every path
    # Each rollout bootstrapped in one call, exactly its cut attempts, from the states they were cut in.
    for rollout, calls in zip(rollouts, backbone.value_calls, strict=True):
        assert len(calls) == sum(a.truncated for a in rollout.attempts) > 0


def split_episodes(mine):
    """An environment's attempts over all rollouts, cut into episodes where the environment ended one (a cut by
    a rollout's end does not end it: the episode goes on in the next rollout). The last one may be running."""
    episodes, current = [], []
    for attempt, text in mine:
        current.append((attempt, text))
        if attempt.terminated:
            episodes.append(current)
            current = []
    return episodes + ([current] if current else [])


def replay_episode(kind, city, seed, episode, coverage) -> None:
    """Play the stored answers on a fresh environment: same prompts, rewards and end flags."""
    env = make_env(kind, city)
    obs, _ = env.reset(seed=seed)
    previous_correct = None
    for k, (attempt, text) in enumerate(episode):
        assert same_prompt(attempt.prompt, _as_prompt(obs)), f"seed {seed}, attempt {k}"
        messages = attempt.prompt[0]
        if previous_correct is False:  # after a failed attempt: the answer, then why it failed
            assert messages[-2] == {"role": "assistant", "content": episode[k - 1][1]}
            assert messages[-1]["role"] == "user" and messages[-1]["content"].startswith(REVISION_PREFIX)
            coverage["revision"] += 1
        else:  # a new episode, or V-IRL's next rail point after a right answer: a fresh chat
            assert len(messages) == 1
        if k and episode[k - 1][0].truncated:
            coverage["carried"] += 1  # this attempt continued an episode the previous rollout cut
        obs, reward, terminated, truncated, info = env.step(text)
        assert attempt.reward == reward and attempt.terminated == terminated and not truncated
        assert attempt.correct == info["correct"]
        if terminated:  # success, or the attempt budget used up: a terminal, never bootstrapped
            assert not attempt.truncated and attempt.bootstrap_value == 0.0
            coverage["budget" if info["budget_exhausted"] else "success"] += 1
        elif attempt.truncated:  # cut by the rollout's end: bootstrapped from the state it was cut in
            assert attempt.bootstrap_value == pytest.approx(state_value(_as_prompt(obs)))
            coverage["cut"] += 1
        previous_correct = bool(info["correct"])


def test_budget_exhausted_attempt_is_a_terminal_with_the_penalty():
    from lit_sftrl.envs.general_points import GeneralPointsEnv

    envs = [GeneralPointsEnv(verify_iter=2, rewards={"budget_exhausted": -0.5}) for _ in range(2)]
    backbone = ScriptedBackbone(envs, good=0.0)
    rollout = RolloutEngine(backbone, SAMPLING).collect(EnvironmentPool(envs, episode_for), 8, seed_for)
    exhausting = [a for a in rollout.attempts if a.attempt_index == 2]
    assert exhausting and all(a.terminated and not a.truncated and a.bootstrap_value == 0.0 for a in exhausting)
    first = [a for a in rollout.attempts if a.attempt_index == 1]
    # The verdict (wrong value -1, wrong numbers -2 or illegal -3) plus the penalty.
    assert {a.reward for a in exhausting} <= {r - 0.5 for r in {a.reward for a in first} | {-1.0, -2.0, -3.0}}
    assert all(result.budget_exhausted and not result.success for result in rollout.finished)


@pytest.mark.parametrize("verify_iter", [5, 10])
def test_training_attempts_reach_the_whole_budget_across_updates(verify_iter):
    """16 environments, 64 attempts per update, 3 updates: each environment makes 12 attempts in all, so an
    episode that fails every attempt reaches its last one only by carrying over from update to update."""
    from lit_sftrl.envs.general_points import GeneralPointsEnv

    envs = [GeneralPointsEnv(verify_iter=verify_iter) for _ in range(16)]
    engine, pool = RolloutEngine(ScriptedBackbone(envs, good=0.0), SAMPLING), EnvironmentPool(envs, episode_for)
    reached = [max(a.attempt_index for a in engine.collect(pool, 64, seed_for).attempts) for _ in range(3)]
    assert max(reached) == verify_iter
    assert reached[0] == 4  # within one update an environment makes only 4 attempts


def test_virl_training_episodes_reach_stop_across_updates(city):
    from lit_sftrl.envs.virl import VIRLEnv

    envs = [VIRLEnv(str(city)) for _ in range(16)]
    engine, pool = RolloutEngine(ScriptedBackbone(envs, good=1.0), SAMPLING), EnvironmentPool(envs, episode_for)
    rollouts = [engine.collect(pool, 64, seed_for) for _ in range(3)]
    finished = [result for rollout in rollouts for result in rollout.finished]
    assert finished and all(result.success for result in finished)  # stop() reached at the rail's end
    # An update gives each environment 4 attempts: longer routes reach stop() only by carrying over.
    assert any(result.attempts > 4 for result in finished)


def test_pool_state_rebuilds_the_running_episodes_exactly(city):
    from lit_sftrl.envs.virl import VIRLEnv

    def play(pool, envs, updates):
        engine = RolloutEngine(ScriptedBackbone(envs, good=0.7), SAMPLING)
        return [[(a.env_index, a.reward, a.answer_ids.tolist()) for a in engine.collect(pool, 10, seed_for).attempts]
                for _ in range(updates)]

    envs = [VIRLEnv(str(city)) for _ in range(3)]
    pool = EnvironmentPool(envs, episode_for)
    unbroken = play(pool, envs, 3)
    envs = [VIRLEnv(str(city)) for _ in range(3)]
    pool = EnvironmentPool(envs, episode_for)
    first = play(pool, envs, 1)
    state = json.loads(json.dumps(pool.state_dict()))  # what a checkpoint keeps: plain data
    assert any(entry["answers"] for entry in state)
    fresh = [VIRLEnv(str(city)) for _ in range(3)]
    resumed = play(EnvironmentPool(fresh, episode_for, state), fresh, 2)
    assert first + resumed == unbroken


def test_collect_without_value_head_needs_no_bootstrap():
    from lit_sftrl.envs.general_points import GeneralPointsEnv

    envs = [GeneralPointsEnv(verify_iter=2) for _ in range(3)]
    backbone = ScriptedBackbone(envs, good=0.2, value_head=False)
    rollout = RolloutEngine(backbone, SAMPLING).collect(EnvironmentPool(envs, episode_for), 10, seed_for)
    assert len(rollout.attempts) == 10 and not backbone.value_calls
    assert all(a.value == 0.0 and a.bootstrap_value == 0.0 for a in rollout.attempts)
    for index in range(3):  # every environment's last attempt ends its episode, or is cut by the rollout
        last = [a for a in rollout.attempts if a.env_index == index][-1]
        assert last.terminated or last.truncated


def test_collect_fewer_attempts_than_environments():
    from lit_sftrl.envs.general_points import GeneralPointsEnv

    envs = [GeneralPointsEnv() for _ in range(4)]
    pool = EnvironmentPool(envs, episode_for)
    rollout = RolloutEngine(ScriptedBackbone(envs, good=0.0), SAMPLING).collect(pool, 3, seed_for)
    assert [a.env_index for a in rollout.attempts] == [0, 1, 2] and not rollout.finished
    assert all(a.truncated for a in rollout.attempts)
    assert [len(running.answers) for running in pool.running] == [1, 1, 1, 0]  # the cut episodes go on


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
    attempts = RolloutEngine(backbone, sampling).collect(EnvironmentPool(envs, episode_for), 7, seed_for).attempts

    scores = backbone.score([a.prompt for a in attempts], [a.answer_ids for a in attempts], sampling.temperature)
    stored = torch.stack([answer_logprob(a.token_logprobs, a.token_weights) for a in attempts])
    assert torch.allclose(scores.logprob_sum, stored, atol=1e-4)
    assert torch.allclose(scores.values, torch.tensor([a.value for a in attempts]), atol=1e-4)
    assert len({round(a.value, 4) for a in attempts}) > 1
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
    from lit_sftrl.training.rollout import _Running

    image = np.zeros((4, 4, 3), np.uint8)
    state = _Running((0, {}), -1, {"messages": (), "image": image})
    state.continue_with({"messages": (), "image": image.copy()}, None)
    assert state.obs["image"] is image
    changed = image.copy()
    changed[0, 0, 0] = 1
    state.continue_with({"messages": (), "image": changed}, None)
    assert state.obs["image"] is changed


@pytest.mark.parametrize("kind", ["gp", "virl"])
def test_thought_coef_weights_the_tokens_before_the_action_field(kind, city, tiny_dir_factory):
    """The environment says where the action field starts; the engine weighs the tokens that end before it."""
    from lit_sftrl.models import Backbone, BackboneConfig

    backbone = Backbone(BackboneConfig(path=str(tiny_dir_factory("mllama"))))
    env = make_env("gp-text" if kind == "gp" else "virl-text", city)
    env.reset(seed=4)
    answer = env.expert_answer()
    field = '"formula"' if kind == "gp" else '"action"'
    ids = torch.tensor(backbone.tokenizer(answer, add_special_tokens=False)["input_ids"])
    _, _, _, _, info = env.step(answer)
    assert info["action_offset"] == answer.index(field)
    generation = Generation(prompt_ids=ids, answer_ids=ids, text=answer, logprobs=-torch.ones(len(ids)), value=0.0)
    weights = RolloutEngine(backbone, SAMPLING, thought_coef=0.5)._thought_weights(generation, info["action_offset"])
    decode = backbone.tokenizer.decode
    before = [n for n in range(len(ids)) if len(decode(ids[: n + 1])) <= info["action_offset"]]
    assert before and len(before) < len(ids)
    assert weights.tolist() == [0.5 if n in before else 1.0 for n in range(len(ids))]
    assert decode(ids[: len(before)]) == answer[: len(decode(ids[: len(before)]))]  # a prefix of the text
    assert field.strip('"') in decode(ids[len(before) - 1 :])  # the field begins in the first full-weight tokens
    assert RolloutEngine(backbone, SAMPLING)._thought_weights(generation, info["action_offset"]) is None  # coef 1
