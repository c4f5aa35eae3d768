"""The batched multi-turn rollout engine: the only place where environments and models meet.

Environments do not wait for each other: each holds a slot of one in-flight decoding batch
(:mod:`lit_sftrl.models.inflight`); when its answer ends it leaves the batch, the environment steps, and its next
prompt (a revision turn, the next rail point, a new episode) joins the running batch. Each keeps its own
conversation, revision turns included. Data flows one way: env observation -> prompt -> decoder -> answer text
-> env.step, and what the environment judged (correct, well-formed,
success, budget exhausted, where the action field starts) comes back in ``info``; nothing is judged here.

Training environments live in an :class:`EnvironmentPool` that outlives each PPO update, as in the original
trainer: an episode running when an update's rollout ends is cut there (a truncation, bootstrapped from the cut
state's value) and goes on in the next update. A running episode also holds the model's cache of its
conversation (opaque here), handed back with the next prompt so the model encodes only the turn's new tokens;
caches are dropped when a new rollout starts, because the weights changed under them.

Sampling is seeded per row (episode and attempt), never by batch: an episode samples the same answers whatever
else shares its batch, so a resumed run replays an unbroken one and two sampled evaluations are identical.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from lit_sftrl.core.seeding import stream_seed
from lit_sftrl.data.episodes import Episode
from lit_sftrl.models.backbone import Backbone, Generation, Prompt, SamplingConfig
from lit_sftrl.models.inflight import InflightDecoder, LockstepDecoder, Request, supports_inflight
from lit_sftrl.models.kv_cache import ConversationCache
from lit_sftrl.training.transcripts import TranscriptAttempt


@dataclass
class Attempt:
    """One answer to one prompt, with everything PPO needs. Sampled token ids are stored, never re-tokenised."""

    prompt: Prompt
    answer_ids: torch.Tensor
    token_logprobs: torch.Tensor  # fp32 log-prob of each answer token at the sampling temperature
    token_weights: torch.Tensor | None  # weight of each token in the answer's log-prob (thought_coef); None = 1
    value: float
    reward: float
    correct: bool
    terminated: bool  # the episode ended for good: success, or the attempt budget used up (the paper's MDP)
    truncated: bool  # the episode was cut (the rollout ended mid-episode): bootstrapped from the cut state
    env_index: int
    attempt_index: int  # the environment's attempt counter (GP: attempt of the episode; V-IRL: of the rail point)
    progress: int | None  # V-IRL: the rail point judged
    bootstrap_value: float = 0.0  # V of the cut state (the state itself, not the next episode's first)
    reference_token_logprobs: torch.Tensor | None = None
    prompt_tokens: int = 0  # the prompt's length as scoring lays it out (micro-batches grouped by length)
    reward_components: dict[str, float] | None = None  # what a reward wrapper said the reward is made of
    group: int = -1  # critic-free rollouts: the group (start state) the attempt's episode belongs to
    member: int = -1  # critic-free rollouts: which of the group's episodes


@dataclass
class EpisodeResult:
    """Statistics of one finished episode (what logging and evaluation aggregate), all read from ``info``."""

    success: bool = False
    attempts: int = 0
    correct_attempts: int = 0  # attempts the environment judged correct (V-IRL per-step accuracy)
    well_formed_attempts: int = 0  # attempts the environment could parse as its answer format
    episode_return: float = 0.0
    recognized: bool | None = None  # GP-VL: cards read right on the first attempt
    budget_exhausted: bool = False  # ended by using up an attempt budget (the paper counts one more wrong step)
    transcript: list[TranscriptAttempt] | None = None  # per attempt, when the engine keeps transcripts

    def record(self, reward: float, info: dict[str, Any]) -> None:
        self.attempts += 1
        self.episode_return += float(reward)
        self.correct_attempts += bool(info.get("correct"))
        self.well_formed_attempts += bool(info.get("well_formed"))
        self.success = bool(info.get("success"))
        self.budget_exhausted = bool(info.get("budget_exhausted"))
        if self.attempts == 1:
            self.recognized = info.get("recognized")


@dataclass
class _Running:
    """An environment's episode in progress: what rebuilds it (episode number, answers so far), its current
    observation and statistics, and the model's keys and values of its conversation so far."""

    episode: Episode
    number: int  # the episode's index in its environment's stream (training); -1 for evaluation
    obs: dict[str, Any]
    answers: list[str] = field(default_factory=list)
    result: EpisodeResult = field(default_factory=EpisodeResult)
    cache: ConversationCache | None = None

    @property
    def last_prompt(self) -> Prompt:
        """The prompt of the next attempt: the conversation so far and the image."""
        return self.obs["messages"], self.obs.get("image")

    def step(self, env: Any, answer: str) -> tuple:
        step = env.step(answer)
        self.answers.append(answer)
        self.result.record(step[1], step[4])
        return step

    def continue_with(self, obs: dict[str, Any], cache: ConversationCache | None) -> None:
        """Move on to the next observation, sharing the image array while it is unchanged: environments hand out
        a fresh copy each step, and a stored attempt per copy costs megabytes at the paper's 1200 px."""
        previous = self.obs.get("image")
        if previous is not None and "image" in obs and np.array_equal(previous, obs["image"]):
            obs = {**obs, "image": previous}
        self.obs, self.cache = obs, cache


def _start(env: Any, episode: Episode, number: int) -> _Running:
    seed, options = episode
    obs, _ = env.reset(seed=seed, options=options or None)
    return _Running(episode, number, obs)


class GroupedEpisodes:
    """A rank's critic-free training episodes: group ``g`` is ``group_size`` plays of one start state (the same
    reset seed), each member sampled from its own seeds. Whole episodes are played within one update, so what
    carries from one update to the next is only the number of the next group: :meth:`state_dict` is all a
    ``--ckpt_path last`` resume needs.

    ``episode_for(group)`` names a group's episode; ``seed_for(group, member, attempt)`` seeds the sampling of a
    member's attempt (so a member samples the same answers whichever environment slot plays it).
    """

    def __init__(
        self, envs: Sequence[Any], group_size: int, episode_for: Callable[[int], Episode],
        seed_for: Callable[[int, int, int], int], state: dict[str, int] | None = None,
    ) -> None:
        if state is not None and not (isinstance(state, dict) and "next_group" in state):
            raise ValueError("the checkpoint holds running episodes of a run with ppo.advantage gae: resume it with "
                             "gae, or start a critic-free run from it with --model.init_args.init_from")
        self.envs, self.group_size = list(envs), group_size
        self.episode_for, self.seed_for = episode_for, seed_for
        self.next_group = int(state["next_group"]) if state else 0

    def state_dict(self) -> dict[str, int]:
        return {"next_group": self.next_group}


class EnvironmentPool:
    """A rank's training environments and their running episodes, carried from one PPO update to the next.

    ``episode_for(env_index, number)`` names each environment's episodes. :meth:`state_dict` is what rebuilds the
    pool exactly (each running episode's number and the answers given so far, replayed through the environment),
    so ``--ckpt_path last`` continues the very same episodes.
    """

    def __init__(self, envs: Sequence[Any], episode_for: Callable[[int, int], Episode], state: list | None = None):
        self.envs, self.episode_for = list(envs), episode_for
        if isinstance(state, dict):
            raise ValueError("the checkpoint is of a critic-free run (ppo.advantage grpo, rloo or reinforce_pp): "
                             "resume it with the same estimator, or start a gae run from it with init_from")
        if state is not None and len(state) != len(self.envs):
            raise ValueError(f"the checkpoint's rollout state has {len(state)} environments, this run {len(self.envs)}")
        self.running: list[_Running] = []
        for index, env in enumerate(self.envs):
            number = state[index]["episode"] if state else 0
            running = _start(env, episode_for(index, number), number)
            for answer in state[index]["answers"] if state else []:  # replay: environments are deterministic
                obs, *_ = running.step(env, answer)
                running.continue_with(obs, None)
            self.running.append(running)

    def state_dict(self) -> list[dict[str, Any]]:
        return [{"episode": running.number, "answers": list(running.answers)} for running in self.running]

    def next_episode(self, index: int) -> _Running:
        number = self.running[index].number + 1
        self.running[index] = _start(self.envs[index], self.episode_for(index, number), number)
        return self.running[index]


@dataclass
class Rollout:
    """What one PPO rollout produced: its attempts in play order, the episodes that finished during it, and
    where the time went."""

    attempts: list[Attempt]
    finished: list[EpisodeResult]
    seconds: dict[str, float]
    inference_tokens: int

    def totals(self) -> list[float]:
        """What adds up over ranks: attempts, their rewards, correct ones, finished episodes' attempts, tokens."""
        return [len(self.attempts), sum(a.reward for a in self.attempts), sum(a.correct for a in self.attempts),
                sum(r.attempts for r in self.finished), self.inference_tokens]

    def reward_components(self) -> dict[str, float]:
        """Each reward component's sum over the attempts, in name order (empty when nothing reports any)."""
        sums: dict[str, float] = {}
        for attempt in self.attempts:
            for name, value in (attempt.reward_components or {}).items():
                sums[name] = sums.get(name, 0.0) + float(value)
        return dict(sorted(sums.items()))

    def furthest(self) -> list[int]:
        """How far episodes got: the largest attempt index and rail index of this rollout."""
        return [max((a.attempt_index for a in self.attempts), default=0),
                max((a.progress or 0 for a in self.attempts), default=0)]

    def timing(self) -> dict[str, float]:
        seconds = max(self.seconds["rollout"], 1e-9)
        return {"time/rollout_s": self.seconds["rollout"], "time/model_share": self.seconds["model"] / seconds,
                "time/attempts_per_s": len(self.attempts) / seconds,
                "time/rollout_tokens_per_s": self.inference_tokens / seconds}


class RolloutEngine:
    """Plays episodes of many environments at once with one backbone.

    Args:
        backbone: the policy (and value head, for PPO).
        sampling: decoding settings (temperature, top-p, max new tokens); temperature 0 is greedy.
        thought_coef: weight of the answer's tokens before its action field in the answer's log-prob (1.0: a plain
            sum; the paper 0.5). The environment says where the action field starts (``info["action_offset"]``).
        keep_transcripts: record prompt, answer, feedback and reward of every attempt in ``EpisodeResult``.
        decoding: ``inflight`` (default): one slot per environment; an answer that ends leaves the batch at once
            and its environment's next prompt joins the running batch (:mod:`lit_sftrl.models.inflight`).
            ``lockstep``: every waiting prompt in one ``generate`` call, decoded until its longest answer ends
            (the engine before; also what a backbone without in-flight support gets).
    """

    def __init__(
        self, backbone: Backbone, sampling: SamplingConfig, thought_coef: float = 1.0, keep_transcripts: bool = False,
        decoding: Literal["inflight", "lockstep"] = "inflight",
    ) -> None:
        self.backbone, self.sampling, self.decoding = backbone, sampling, decoding
        self.thought_coef, self.keep_transcripts = thought_coef, keep_transcripts
        self.seconds = {"model": 0.0, "environment": 0.0}
        self.inference_tokens = 0

    # --------------------------------------------------------------------------------------- PPO

    def collect(
        self, pool: EnvironmentPool, num_attempts: int, seed_for: Callable[[int, int], int],
        on_attempts: Callable[[int], None] | None = None,
    ) -> Rollout:
        """Roll the pool's episodes on until ``num_attempts`` attempts are collected. ``seed_for(env, k)`` seeds the
        sampling of environment ``env``'s ``k``-th attempt of this rollout. ``on_attempts(n)``: called with the
        number of attempts that just finished, each time some finish."""
        start = time.perf_counter()
        self.seconds, self.inference_tokens = {"model": 0.0, "environment": 0.0}, 0
        for running in pool.running:
            running.cache = None  # the weights changed since these were computed
        attempts: list[Attempt] = []
        finished: list[EpisodeResult] = []
        cuts: list[tuple[Attempt, _Running]] = []
        counts = [0] * len(pool.envs)
        decoder = self._decoder(len(pool.envs))

        def submit(i: int) -> None:
            running = pool.running[i]
            decoder.submit(Request(running.last_prompt, running.cache, seed_for(i, counts[i]), tag=i))
            counts[i] += 1

        for i in range(min(len(pool.envs), num_attempts)):
            submit(i)
        with decoder:  # one model mode for the whole loop (see InflightDecoder.__enter__)
            while len(decoder):
                done = 0
                advanced = self._advance(pool.envs, pool.running, decoder)
                for i, generation, (obs, reward, terminated, truncated, info) in advanced:
                    done += 1
                    attempts.append(self._attempt(pool.running[i], i, generation, reward, terminated, truncated, info))
                    if terminated or truncated:
                        if truncated and not terminated:  # the environment cut it (a time limit): bootstrap from there
                            cuts.append((attempts[-1], _Running(pool.running[i].episode, -1, obs)))
                        finished.append(pool.running[i].result)
                        pool.next_episode(i)
                    else:
                        pool.running[i].continue_with(obs, generation.cache)
                    if sum(counts) < num_attempts:  # the next prompt joins the running batch at once
                        submit(i)
                if done and on_attempts is not None:
                    on_attempts(done)
        cuts += self._cut_at_end(attempts, pool)
        self._bootstrap(cuts)
        self.seconds["rollout"] = time.perf_counter() - start
        return Rollout(attempts, finished, dict(self.seconds), self.inference_tokens)

    def collect_groups(
        self, pool: GroupedEpisodes, num_attempts: int, on_attempts: Callable[[int], None] | None = None
    ) -> Rollout:
        """Play whole groups of episodes until ``num_attempts`` attempts are collected: a new group starts only
        while the attempts collected, plus one for each episode started or waiting, stay under ``num_attempts``;
        every episode started is played to its end (so an update may hold a few attempts more). The members of a
        group wait in a queue for a free environment; the environments are only slots."""
        start = time.perf_counter()
        self.seconds, self.inference_tokens = {"model": 0.0, "environment": 0.0}, 0
        attempts: list[Attempt] = []
        finished: list[EpisodeResult] = []
        waiting: list[tuple[int, int]] = []  # (group, member) not yet given an environment
        running: dict[int, tuple[tuple[int, int], _Running]] = {}  # slot -> (group, member), episode
        decoder = self._decoder(len(pool.envs))

        def fill(slot: int) -> None:
            if not waiting and len(attempts) + len(running) < num_attempts:
                waiting.extend((pool.next_group, member) for member in range(pool.group_size))
                pool.next_group += 1
            if waiting:
                key = waiting.pop(0)
                running[slot] = (key, self._start(pool.envs[slot], pool.episode_for(key[0])))
                submit(slot)

        def submit(slot: int) -> None:
            (group, member), state = running[slot]
            seed = pool.seed_for(group, member, state.result.attempts)
            decoder.submit(Request(state.last_prompt, state.cache, seed, tag=slot))

        for slot in range(len(pool.envs)):
            fill(slot)
        states = {slot: state for slot, (_, state) in running.items()}
        with decoder:  # one model mode for the whole loop (see InflightDecoder.__enter__)
            while len(decoder):
                done = 0
                for slot, generation, (obs, reward, terminated, truncated, info) in self._advance(
                    pool.envs, states, decoder
                ):
                    done += 1
                    (group, member), state = running[slot]
                    attempt = self._attempt(state, slot, generation, reward, terminated, truncated, info)
                    attempt.group, attempt.member = group, member
                    attempts.append(attempt)
                    if terminated or truncated:  # the episode's end: nothing to bootstrap without a critic
                        finished.append(state.result)
                        del running[slot], states[slot]
                        fill(slot)
                        if slot in running:
                            states[slot] = running[slot][1]
                    else:
                        state.continue_with(obs, generation.cache)
                        submit(slot)
                if done and on_attempts is not None:
                    on_attempts(done)
        self.seconds["rollout"] = time.perf_counter() - start
        return Rollout(attempts, finished, dict(self.seconds), self.inference_tokens)

    def _attempt(
        self, running: _Running, index: int, generation: Generation, reward, terminated, truncated, info
    ) -> Attempt:
        return Attempt(
            prompt=running.last_prompt, answer_ids=generation.answer_ids, token_logprobs=generation.logprobs,
            token_weights=self._thought_weights(generation, info.get("action_offset")),
            value=float(generation.value or 0.0), reward=float(reward), correct=bool(info.get("correct")),
            terminated=bool(terminated), truncated=bool(truncated and not terminated), env_index=index,
            attempt_index=int(info.get("attempt", 0)), progress=info.get("rail_index"),
            prompt_tokens=len(generation.prompt_ids), reward_components=info.get("reward_components"),
        )

    def _thought_weights(self, generation: Generation, action_offset: int | None) -> torch.Tensor | None:
        """``thought_coef`` for the tokens that end before the action field's offset in the decoded answer, 1 for
        the rest. The span comes from the decoded text (never from hard-coded token ids)."""
        if self.thought_coef == 1.0 or action_offset is None:
            return None
        ids = generation.answer_ids.tolist()
        decode = self.backbone.tokenizer.decode
        ends = [len(decode(ids[: n + 1], skip_special_tokens=True)) for n in range(len(ids))]
        return torch.tensor([self.thought_coef if end <= action_offset else 1.0 for end in ends])

    def _cut_at_end(self, attempts: list[Attempt], pool: EnvironmentPool) -> list[tuple[Attempt, _Running]]:
        """The rollout's end cuts each environment's running episode after its last attempt (a truncation)."""
        last: dict[int, Attempt] = {}
        for attempt in attempts:
            last[attempt.env_index] = attempt
        cuts = []
        for index, attempt in last.items():
            if not (attempt.terminated or attempt.truncated):
                attempt.truncated = True
                cuts.append((attempt, pool.running[index]))
        return cuts

    def _bootstrap(self, cuts: list[tuple[Attempt, _Running]]) -> None:
        if not cuts or not self.backbone.config.value_head:
            return
        start = time.perf_counter()
        values = self.backbone.prompt_values(
            [state.last_prompt for _, state in cuts], [state.cache for _, state in cuts]
        )
        self.seconds["model"] += time.perf_counter() - start
        for (attempt, _), value in zip(cuts, values.tolist()):
            attempt.bootstrap_value = value

    # --------------------------------------------------------------------------------------- evaluation

    def evaluate(
        self, envs: Sequence[Any], episodes: Sequence[Episode], on_attempts: Callable[[int], None] | None = None
    ) -> list[EpisodeResult]:
        """Play each episode to its end; results come back in the order of ``episodes``. Sampled decoding is
        seeded by the episode's reset seed and the attempt number, so evaluations of a checkpoint are identical.
        ``on_attempts`` as in :meth:`collect`."""
        queue = list(enumerate(episodes))
        results: dict[int, EpisodeResult] = {}
        running: dict[int, tuple[int, _Running]] = {}
        decoder = self._decoder(len(envs))

        def submit(i: int) -> None:
            state = running[i][1]
            seed = stream_seed("eval_sampling", state.episode[0], state.result.attempts)
            decoder.submit(Request(state.last_prompt, state.cache, seed, tag=i))

        for i, env in enumerate(envs[: len(queue)]):
            index, episode = queue.pop(0)
            running[i] = (index, self._start(env, episode))
            submit(i)
        states = {i: state for i, (_, state) in running.items()}
        with decoder:  # one model mode for the whole loop (see InflightDecoder.__enter__)
            while len(decoder):
                done = 0
                for i, generation, (obs, _, terminated, truncated, _) in self._advance(envs, states, decoder):
                    done += 1
                    index, state = running[i]
                    if terminated or truncated:
                        results[index] = state.result
                        del running[i]
                        if not queue:
                            continue
                        next_index, episode = queue.pop(0)
                        running[i] = (next_index, self._start(envs[i], episode))
                        states[i] = running[i][1]
                    else:
                        state.continue_with(obs, generation.cache)
                    submit(i)
                if done and on_attempts is not None:
                    on_attempts(done)
        return [results[i] for i in range(len(episodes))]

    # --------------------------------------------------------------------------------------- shared

    def _start(self, env: Any, episode: Episode) -> _Running:
        start = time.perf_counter()
        running = _start(env, episode, -1)
        self.seconds["environment"] += time.perf_counter() - start
        if self.keep_transcripts:
            running.result.transcript = []
        return running

    def _decoder(self, slots: int) -> InflightDecoder | LockstepDecoder:
        inflight = self.decoding == "inflight" and supports_inflight(self.backbone)
        return (InflightDecoder if inflight else LockstepDecoder)(self.backbone, self.sampling, slots)

    def _advance(self, envs: Sequence[Any], running, decoder: InflightDecoder | LockstepDecoder):
        """One step of the decoder (the answers that ended), then one environment step for each of them. Each
        conversation went to the model with its cache from the previous turn, so only its new tokens are encoded."""
        start = time.perf_counter()
        finished = decoder.step()
        self.seconds["model"] += time.perf_counter() - start
        for i, generation in finished:
            self.inference_tokens += generation.num_tokens
            start = time.perf_counter()
            step = running[i].step(envs[i], generation.text)
            self.seconds["environment"] += time.perf_counter() - start
            if running[i].result.transcript is not None:
                running[i].result.transcript.append(_transcript_entry(running[i], generation.text, step))
            yield i, generation, step


def _transcript_entry(running: _Running, answer: str, step: tuple) -> TranscriptAttempt:
    messages, image = running.last_prompt
    return TranscriptAttempt(list(messages), answer, step[4].get("feedback"), float(step[1]), image is not None)
