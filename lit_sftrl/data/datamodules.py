"""LightningDataModules: which episodes to train and evaluate on. Playing them is the modules' job.

Every stream here is a pure function of ``(seed, rank, index)``, so each rank and dataloader worker draws
different episodes, a resumed run continues at the exact data position, and two evaluations of any
checkpoints see identical episodes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import count
from typing import Any, Literal

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, get_worker_info

from lit_sftrl.core.seeding import stream_rng, stream_seed
from lit_sftrl.core.validation import DataError, check_values, validate
from lit_sftrl.data.episodes import EvalEpisodes, RolloutSpec
from lit_sftrl.data.llava_data import MAX_TURN_CHARS, checked_llava_json
from lit_sftrl.data.messages import decode_image, read_messages
from lit_sftrl.data.tasks import TaskConfig
from lit_sftrl.envs.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS

Conversation = dict[str, Any]  # {"messages": [...ending with the assistant turn], "image": ndarray | None}
AssistantTurns = Literal["all", "last"]  # which assistant turns of a conversation SFT trains on
PAPER_TEST_EPISODES = {"gp": 234, "virl": 48, "virl_visual_ood": 18}


def keep_as_is(item: Any) -> Any:
    """Dataloader collate function: items are already batches, and images must stay numpy arrays."""
    return item


@dataclass
class EvalConfig:
    """Fixed evaluation episodes.

    Args:
        val_episodes: episodes per variant for validation during fit (a small subset).
        test_episodes: episodes per variant for ``lit-sftrl test``; ``None`` uses the paper's sizes
            (234 GeneralPoints hands, and as many episodes of any other environment; 48 V-IRL routes; every route
            of the visual_ood city).
        chunk: episodes played together in one batched validation/test step.
        seed: seed of the evaluation episodes; the same for every checkpoint.
        variants: which variants to evaluate; ``None`` means every variant of the task.
    """

    val_episodes: int = 32
    test_episodes: int | None = None
    chunk: int = 16
    seed: int = 1234
    variants: list[str] | None = None

    def __post_init__(self) -> None:
        validate(self, "evaluation")


class EvalChunks(Dataset):
    def __init__(self, chunks: list[EvalEpisodes]) -> None:
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> EvalEpisodes:
        return self.chunks[index]


class AlreadySharded(DistributedSampler):
    """In-order sampler over a dataset that already is this rank's share (see ``EpisodeDataModule.rank_chunks``).

    Being a ``DistributedSampler``, it keeps Lightning from sharding the dataset again with one that pads the last
    ranks with repeated chunks, whose episodes the synchronised metrics would then count twice.
    """

    def __init__(self, dataset: Dataset) -> None:  # no process group needed: nothing to split
        self.dataset = dataset

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.dataset)))

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        pass


class EpisodeDataModule(L.LightningDataModule):
    """Validation and test episodes of every variant; subclasses add the training stream."""

    def __init__(self, task: TaskConfig | None, evaluation: EvalConfig | None, seed: int) -> None:
        super().__init__()
        self.task = task or TaskConfig()
        self.evaluation = evaluation or EvalConfig()
        self.seed = seed
        for variant in self.eval_variants:
            self.task.check_variant(variant)

    @property
    def eval_variants(self) -> list[str]:
        return list(self.evaluation.variants or self.task.variant_names)

    def prepare_data(self) -> None:
        self.task.prepare()

    def num_test_episodes(self, variant: str) -> int:
        if self.evaluation.test_episodes is not None:
            return self.evaluation.test_episodes
        if not self.task.is_virl:
            return PAPER_TEST_EPISODES["gp"]
        if variant == "visual_ood":
            return self._num_routes("visual_ood")
        return PAPER_TEST_EPISODES["virl"]

    def eval_chunks(self, variant: str, num_episodes: int) -> list[EvalEpisodes]:
        """The fixed evaluation episodes of ``variant``, in chunks; V-IRL plays route i, at most every route once."""
        env_id, env_kwargs = self.task.env_spec(variant)
        variant_index = self.task.variant_names.index(variant)
        if self.task.is_virl:  # a small benchmark city (18 visual_ood routes) has fewer routes than asked for
            num_episodes = min(num_episodes, self._num_routes(variant))
        episodes = []
        for i in range(num_episodes):
            seed = stream_seed("evaluation", self.evaluation.seed, variant_index, i)
            # V-IRL evaluates route i, so every route of a small benchmark city is seen once.
            episodes.append((seed, {"route_index": i} if self.task.is_virl else {}))
        size = self.evaluation.chunk
        wrappers = self.task.wrapping(evaluation=True)
        return [
            EvalEpisodes(self.task.name, variant, env_id, env_kwargs, episodes[i : i + size], wrappers)
            for i in range(0, len(episodes), size)
        ]

    def _num_routes(self, variant: str) -> int:
        return self.task.make_env(variant).num_routes

    def rank_chunks(self, variant: str, num_episodes: int, rank: int, world_size: int) -> list[EvalEpisodes]:
        """Rank ``rank``'s share of the chunks (round-robin). A rank left without one gets an empty chunk, so that
        every rank updates, and synchronises, every variant's metrics."""
        chunks = self.eval_chunks(variant, num_episodes)
        mine = chunks[rank::world_size]
        if not mine:
            env_id, env_kwargs = self.task.env_spec(variant)
            mine = [EvalEpisodes(self.task.name, variant, env_id, env_kwargs, [], self.task.wrapping(evaluation=True))]
        return mine

    def _eval_loaders(self, sizes: dict[str, int]) -> list[DataLoader]:
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return [
            DataLoader(chunks, batch_size=None, sampler=AlreadySharded(chunks), collate_fn=keep_as_is)
            for chunks in (EvalChunks(self.rank_chunks(variant, n, rank, world_size)) for variant, n in sizes.items())
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders({v: self.evaluation.val_episodes for v in self.eval_variants})

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders({v: self.num_test_episodes(v) for v in self.eval_variants})


# ----------------------------------------------------------------------------------------------- SFT


def expert_conversations(
    env: Any, seed: int, options: dict, rng: np.random.Generator, multi_turn: float
) -> list[Conversation]:
    """Play one episode with the expert; one conversation per prompt the environment showed (docs/spec.md §4).

    With probability ``multi_turn`` a prompt is first answered with the environment's sub-optimal answer, so
    the conversation holds the wrong answer, the feedback turn and the correction (the paper's App. C.1).
    """
    obs, _ = env.reset(seed=seed, options=options)
    conversations, done = [], False
    while not done:
        if multi_turn and rng.random() < multi_turn:
            obs, _, terminated, truncated, _ = env.step(env.suboptimal_answer())
            if terminated or truncated:  # a budget of one attempt leaves no room for a correction
                break
        answer = env.expert_answer()
        conversations.append(
            {"messages": [*obs["messages"], {"role": "assistant", "content": answer}], "image": obs.get("image")}
        )
        obs, _, terminated, truncated, _ = env.step(answer)
        done = terminated or truncated
    return conversations


class SFTBatches(IterableDataset):
    """Endless stream of SFT batches; batch ``b`` of rank ``r`` is a pure function of ``(seed, r, b)``.

    Workers take batches round-robin, which is the order the DataLoader returns them in, so the stream is
    identical for any number of workers and restarts exactly at ``start``.
    """

    def __init__(self, source: ExpertSource | FileSource, batch_size: int, seed: int, rank: int, start: int,
                 assistant_turns: AssistantTurns = "last") -> None:
        self.source, self.batch_size, self.seed, self.rank, self.start = source, batch_size, seed, rank, start
        self.assistant_turns = assistant_turns

    def __iter__(self) -> Iterator[list[Conversation]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        for index in count(self.start + worker_id, num_workers):
            batch = self.source.batch(stream_rng("sft_batches", self.seed, self.rank, index), self.batch_size)
            # Each sample says which of its assistant turns are trained on (SFTModule reads it).
            yield [{**sample, "assistant_turns": self.assistant_turns} for sample in batch]


class ExpertSource:
    """SFT samples from expert play of the task's training environment (id variant; wrappers do not change what
    the expert answers)."""

    def __init__(self, task: TaskConfig, multi_turn: float) -> None:
        self.task, self.multi_turn = task, multi_turn
        self._env = None

    def batch(self, rng: np.random.Generator, size: int) -> list[Conversation]:
        if self._env is None:  # built lazily, inside the dataloader worker
            self._env = self.task.make_env("id")
        pool: list[Conversation] = []
        while len(pool) < size:
            pool += expert_conversations(self._env, int(rng.integers(2**31)), {}, rng, self.multi_turn)
        # A V-IRL episode yields one sample per rail point; sampling keeps every point equally likely.
        return [pool[i] for i in rng.choice(len(pool), size, replace=False)]


class FileSource:
    """SFT samples read from a file (images checked there, kept as paths), drawn uniformly with replacement;
    an image is decoded when a batch draws it."""

    def __init__(self, conversations: list[Conversation], max_image_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.conversations, self.max_image_pixels = conversations, max_image_pixels

    def batch(self, rng: np.random.Generator, size: int) -> list[Conversation]:
        drawn = [self.conversations[i] for i in rng.integers(len(self.conversations), size=size)]
        return [{**c, "image": decode_image(c["image"], self.max_image_pixels)}
                if isinstance(c["image"], (str, bytes)) else c for c in drawn]


class LlavaSource(FileSource):
    """SFT samples from a released LLaVA-style JSON file (:mod:`lit_sftrl.data.llava_data`)."""

    def __init__(self, path: str, image_folder: str | None, **limits: int) -> None:
        # Images checked (folder, file type, size, header's pixel count, whole data) when the file is read, decoded
        # when a batch draws them; turns checked for length before anything tokenises them.
        with data_errors():
            conversations = checked_llava_json(path, image_folder, **limits)
        super().__init__(conversations, limits.get("max_image_pixels", MAX_IMAGE_PIXELS))


class MessagesSource(FileSource):
    """SFT samples from ``messages`` JSONL, a ``datasets`` directory or parquet (:mod:`lit_sftrl.data.messages`)."""

    def __init__(self, path: str, max_image_pixels: int = MAX_IMAGE_PIXELS) -> None:
        with data_errors():
            conversations = read_messages(path, lazy=True, max_image_pixels=max_image_pixels)
        super().__init__(conversations, max_image_pixels)


@contextmanager
def data_errors() -> Iterator[None]:
    """A reader's ValueError (a record named, what is wrong) as a DataError: the CLI ends the run with that line."""
    try:
        yield
    except ValueError as error:
        raise DataError(str(error)) from None


class SFTDataModule(EpisodeDataModule):
    """Expert episodes (or a data file) for SFT, plus fixed evaluation episodes.

    Args:
        task: the environment the expert plays.
        batch_size: conversations per batch and rank.
        multi_turn: share of prompts first answered wrongly, then corrected (paper App. C.1; 0 = off).
        llava_json: read samples from this LLaVA-style JSON file instead of playing the environment.
        image_folder: folder that the JSON's image paths are relative to (default: the JSON's folder).
        messages: read samples from this conversational data instead: a ``messages`` JSONL file, a Hugging Face
            ``datasets`` directory (``save_to_disk``) or a parquet file, with a ``messages`` column and optional
            ``images`` (paths relative to the data's folder; docs/how-to/sft-data.md).
        assistant_turns: which assistant turns the loss covers: ``all`` of them, or the ``last`` one only (the
            earlier ones are then context, as the wrong answers of a revision conversation must be). Default: ``all``
            for ``messages`` data, ``last`` for expert play and LLaVA-style files.
        max_image_pixels: the most pixels an image of the data may declare in its file header, checked before
            anything is decoded (40 M by default: a 140 KB PNG can declare 432 MB of pixels; ceiling 400 M).
        max_image_bytes: the largest image file of a LLaVA-style JSON, checked before it is opened (64 MiB;
            ceiling 1 GiB).
        max_turn_chars: the most characters in one turn of a LLaVA-style JSON, checked before it is tokenised
            (100,000; ceiling 1,000,000). Every image is also verified whole when the file is read.
        num_workers: dataloader worker processes.
        seed: seed of the training stream.
        evaluation: the fixed validation/test episodes.
    """

    def __init__(
        self,
        task: TaskConfig | None = None,
        batch_size: int = 8,
        multi_turn: float = 0.0,
        llava_json: str | None = None,
        image_folder: str | None = None,
        messages: str | None = None,
        assistant_turns: AssistantTurns | None = None,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        max_image_bytes: int = MAX_IMAGE_BYTES,
        max_turn_chars: int = MAX_TURN_CHARS,
        num_workers: int = 0,
        seed: int = 0,
        evaluation: EvalConfig | None = None,
    ) -> None:
        super().__init__(task, evaluation, seed)
        check_values("data.", batch_size=batch_size, multi_turn=multi_turn, num_workers=num_workers,
                     max_image_pixels=max_image_pixels, max_image_bytes=max_image_bytes, max_turn_chars=max_turn_chars)
        self.batch_size, self.multi_turn, self.num_workers = batch_size, multi_turn, num_workers
        if llava_json and messages:
            raise ValueError("data.llava_json and data.messages both name training data: give one")
        self.llava_json, self.image_folder, self.max_image_pixels = llava_json, image_folder, max_image_pixels
        self.messages = messages
        self.assistant_turns = assistant_turns or ("all" if messages else "last")
        self.llava_limits = {"max_image_pixels": max_image_pixels, "max_image_bytes": max_image_bytes,
                             "max_turn_chars": max_turn_chars}
        self.batches_consumed = 0

    def train_dataloader(self) -> DataLoader:
        if self.llava_json:
            source = LlavaSource(self.llava_json, self.image_folder, **self.llava_limits)
        elif self.messages:
            source = MessagesSource(self.messages, self.max_image_pixels)
        else:
            source = ExpertSource(self.task, self.multi_turn)
        rank = self.trainer.global_rank if self.trainer else 0
        dataset = SFTBatches(source, self.batch_size, self.seed, rank, start=self.batches_consumed,
                             assistant_turns=self.assistant_turns)
        return DataLoader(dataset, batch_size=None, collate_fn=keep_as_is, num_workers=self.num_workers)

    def state_dict(self) -> dict[str, Any]:
        # Checkpoints are written after an optimizer step, so this is the exact stream position.
        trainer = self.trainer
        return {"batches_consumed": trainer.global_step * trainer.accumulate_grad_batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_consumed = state_dict["batches_consumed"]


# ----------------------------------------------------------------------------------------------- RL


class RolloutSpecs(Dataset):
    """One item per epoch: a PPO update is one Lightning epoch, so resuming restarts at an update."""

    def __init__(self, spec: RolloutSpec) -> None:
        self.spec = spec

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> RolloutSpec:
        return self.spec


class RLDataModule(EpisodeDataModule):
    """Environments for PPO rollouts, plus fixed evaluation episodes.

    Args:
        task: the environment to train on.
        variant: the training variant (the paper trains on ``id``).
        num_envs: environments rolled out together per rank (one batched generation for all).
        rollout_steps: attempts collected per rank and update (paper: 256 per GPU).
        seed: seed of the training episodes.
        evaluation: the fixed validation/test episodes.
    """

    def __init__(
        self,
        task: TaskConfig | None = None,
        variant: str = "id",
        num_envs: int = 16,
        rollout_steps: int = 256,
        seed: int = 0,
        evaluation: EvalConfig | None = None,
    ) -> None:
        super().__init__(task, evaluation, seed)
        self.task.check_variant(variant)
        check_values("data.", num_envs=num_envs, rollout_steps=rollout_steps)  # num_envs 0 would loop forever
        self.variant, self.num_envs, self.rollout_steps = variant, num_envs, rollout_steps

    def train_dataloader(self) -> DataLoader:
        env_id, env_kwargs = self.task.env_spec(self.variant)
        rank = self.trainer.global_rank if self.trainer else 0
        spec = RolloutSpec(env_id, env_kwargs, self.num_envs, self.rollout_steps, self.seed, rank, self.task.wrapping())
        return DataLoader(RolloutSpecs(spec), batch_size=None, collate_fn=keep_as_is)
