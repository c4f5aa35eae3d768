"""The batched multi-turn rollout engine: the only place where environments and models meet.

``num_envs`` environments advance in lockstep. Every environment waiting for an answer (all of them, since
each is either mid-episode or freshly reset) gets its prompt into one batched generation; each keeps its own
conversation, revision turns included; finished episodes are replaced in place. The original research code
generated one answer at a time; see ``bench/rollout.py`` for the difference this makes.

Data flows one way: env observation -> prompt -> backbone.generate -> answer text -> env.step. Each running
episode also holds the model's cache of its conversation (opaque here), handed back with the next prompt so the
model encodes only the turn's new tokens; it lives only as long as the episode, within one rollout (the weights
never change under it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from lit_sftrl.envs.parsing import extract_json_object
from lit_sftrl.models.backbone import Backbone, Generation, SamplingConfig
from lit_sftrl.models.kv_cache import ConversationCache

Episode = tuple[int, dict[str, Any]]  # (reset seed, reset options)


@dataclass
class Attempt:
    """One answer to one prompt, with everything PPO needs. Sampled token ids are stored, never re-tokenised."""

    prompt: tuple[list[dict[str, str]], Any]
    prompt_ids: torch.Tensor
    answer_ids: torch.Tensor
    logprob: float  # summed fp32 log-prob of the answer under the sampling temperature
    value: float
    reward: float
    terminated: bool  # the episode ended for good (success, or a failure the environment declares final)
    truncated: bool  # the episode was cut: attempt budget used up, or the rollout ended mid-episode
    env_index: int
    bootstrap_value: float = 0.0  # V of the state after a truncation (SPEC §5: the truncated state itself)
    reference_token_logprobs: torch.Tensor | None = None


@dataclass
class EpisodeResult:
    """Statistics of one finished episode (what logging and evaluation aggregate)."""

    success: bool
    attempts: int
    correct_attempts: int  # attempts whose action/answer was right (V-IRL per-step accuracy)
    well_formed_attempts: int  # attempts whose answer parsed as a JSON object
    episode_return: float
    recognized: bool | None  # GP-VL: cards read right on the first attempt
    tokens: int = 0


@dataclass
class _Running:
    """An environment's episode in progress, and the model's keys and values of its conversation so far."""

    obs: dict[str, Any]
    result: EpisodeResult = field(default_factory=lambda: EpisodeResult(False, 0, 0, 0, 0.0, None))
    cache: ConversationCache | None = None

    def continue_with(self, obs: dict[str, Any], cache: ConversationCache | None) -> None:
        """Move on to the next observation, sharing the image array while it is unchanged: environments hand out
        a fresh copy each step, and a stored attempt per copy costs megabytes at the paper's 1200 px."""
        previous = self.obs.get("image")
        if previous is not None and "image" in obs and np.array_equal(previous, obs["image"]):
            obs = {**obs, "image": previous}
        self.obs, self.cache = obs, cache


class RolloutEngine:
    """Plays episodes of many environments at once with one backbone.

    Args:
        backbone: the policy (and value head, for PPO).
        sampling: decoding settings (temperature, top-p, max new tokens).
    """

    def __init__(self, backbone: Backbone, sampling: SamplingConfig) -> None:
        self.backbone, self.sampling = backbone, sampling
        self.seconds = {"model": 0.0, "environment": 0.0}
        self.inference_tokens = 0

    # --------------------------------------------------------------------------------------- PPO

    def collect(self, envs: Sequence[Any], episodes: Iterator[Episode], num_attempts: int) -> tuple[list[Attempt], list[EpisodeResult]]:
        """Roll out until ``num_attempts`` attempts are collected; episodes still running at the end are cut."""
        running = [self._reset(env, next(episodes)) for env in envs]
        attempts: list[Attempt] = []
        finished: list[EpisodeResult] = []
        pending_bootstrap: list[tuple[Attempt, dict[str, Any], ConversationCache | None]] = []
        while len(attempts) < num_attempts:
            active = list(range(min(len(envs), num_attempts - len(attempts))))
            for i, generation, step in self._advance(envs, running, active):
                obs, reward, terminated, truncated, _ = step
                attempt = Attempt(
                    prompt=_prompt(running[i].obs), prompt_ids=generation.prompt_ids, answer_ids=generation.answer_ids,
                    logprob=float(generation.logprobs.sum()), value=float(generation.value or 0.0), reward=float(reward),
                    terminated=terminated, truncated=truncated and not terminated, env_index=i,
                )
                attempts.append(attempt)
                if attempt.truncated:
                    pending_bootstrap.append((attempt, obs, generation.cache))
                if terminated or truncated:
                    finished.append(running[i].result)
                    running[i] = self._reset(envs[i], next(episodes))
                else:
                    running[i].continue_with(obs, generation.cache)
        self._cut_unfinished(attempts, running, pending_bootstrap)
        self._bootstrap(pending_bootstrap)
        return attempts, finished

    def _cut_unfinished(self, attempts: list[Attempt], running: list[_Running], pending: list) -> None:
        """The rollout's end truncates each environment's running episode at its last attempt."""
        last: dict[int, Attempt] = {}
        for attempt in attempts:
            last[attempt.env_index] = attempt
        for index, attempt in last.items():
            if not (attempt.terminated or attempt.truncated):
                attempt.truncated = True
                pending.append((attempt, running[index].obs, running[index].cache))

    def _bootstrap(self, pending: list[tuple[Attempt, dict[str, Any], ConversationCache | None]]) -> None:
        if not pending or not self.backbone.config.value_head:
            return
        start = time.perf_counter()
        values = self.backbone.prompt_values([_prompt(obs) for _, obs, _ in pending], [cache for *_, cache in pending])
        self.seconds["model"] += time.perf_counter() - start
        for (attempt, *_), value in zip(pending, values.tolist()):
            attempt.bootstrap_value = value

    # --------------------------------------------------------------------------------------- evaluation

    def evaluate(self, envs: Sequence[Any], episodes: Sequence[Episode]) -> list[EpisodeResult]:
        """Play each episode to its end; results come back in the order of ``episodes``."""
        queue = list(enumerate(episodes))
        results: dict[int, EpisodeResult] = {}
        running: dict[int, tuple[int, _Running]] = {}
        for i, env in enumerate(envs[: len(queue)]):
            index, episode = queue.pop(0)
            running[i] = (index, self._reset(env, episode))
        while running:
            states = {i: state for i, (_, state) in running.items()}
            for i, generation, step in self._advance(envs, states, sorted(running)):
                obs, _, terminated, truncated, _ = step
                index, state = running[i]
                if terminated or truncated:
                    results[index] = state.result
                    del running[i]
                    if queue:
                        next_index, episode = queue.pop(0)
                        running[i] = (next_index, self._reset(envs[i], episode))
                else:
                    state.continue_with(obs, generation.cache)
        return [results[i] for i in range(len(episodes))]

    # --------------------------------------------------------------------------------------- shared

    def _reset(self, env: Any, episode: Episode) -> _Running:
        seed, options = episode
        start = time.perf_counter()
        obs, _ = env.reset(seed=seed, options=options or None)
        self.seconds["environment"] += time.perf_counter() - start
        return _Running(obs)

    def _advance(self, envs: Sequence[Any], running: Sequence[_Running] | dict[int, _Running], active: list[int]) -> Iterator[tuple[int, Generation, tuple]]:
        """One batched generation for the ``active`` environments, then one step of each. Each conversation goes
        to the model with its cache from the previous turn, so only its new tokens are encoded."""
        start = time.perf_counter()
        prompts, caches = [_prompt(running[i].obs) for i in active], [running[i].cache for i in active]
        generations = self.backbone.generate(prompts, self.sampling, caches)
        self.seconds["model"] += time.perf_counter() - start
        for i, generation in zip(active, generations):
            tokens = generation.num_tokens
            self.inference_tokens += tokens
            start = time.perf_counter()
            step = envs[i].step(generation.text)
            self.seconds["environment"] += time.perf_counter() - start
            _record(running[i].result, generation.text, step, tokens)
            yield i, generation, step


def _prompt(obs: dict[str, Any]) -> tuple[list[dict[str, str]], Any]:
    return obs["messages"], obs.get("image")


def _record(result: EpisodeResult, answer: str, step: tuple, tokens: int) -> None:
    _, reward, _, _, info = step
    result.attempts += 1
    result.episode_return += float(reward)
    result.correct_attempts += bool(info.get("correct"))
    result.well_formed_attempts += extract_json_object(answer)[0] is not None
    result.success = bool(info.get("success"))
    result.tokens += tokens
    if result.attempts == 1:
        result.recognized = info.get("recognized")
