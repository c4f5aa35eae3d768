"""In-flight batching: rows that finish leave the batch, waiting prompts join the running one, and every row gets
what it gets decoded alone (answers, fp32 log-probs, values, conversation caches)."""

from __future__ import annotations

import collections

import pytest
import torch

from lit_sftrl.models import Backbone, BackboneConfig, SamplingConfig
from lit_sftrl.models.inflight import InflightDecoder, Request, decode_all, supports_inflight

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12)


def _backbone(tiny_dir) -> Backbone:
    backbone = Backbone(BackboneConfig(path=str(tiny_dir), value_head=True)).eval()
    torch.nn.init.normal_(backbone.value_head.net[-1].weight, std=0.5)  # V = 0 at init would compare nothing
    return backbone


def _uneven_ends(backbone: Backbone, prompts, sampling: SamplingConfig) -> None:
    """Declare end-of-sequence a token the untrained model samples at different depths in different answers, so
    rows finish at different lengths (an untrained model rarely samples its real end-of-turn token)."""
    answers = [g.answer_ids.tolist() for g in backbone.generate(prompts, sampling, seeds=list(range(len(prompts))))]
    depth = collections.defaultdict(set)
    for answer in answers:
        for position, token in enumerate(answer[:-1]):
            depth[token].add(position)
    token = max(depth, key=lambda t: (len(depth[t]), -min(depth[t])))
    backbone.eos_ids = sorted({*backbone.eos_ids, token})


def _prompts(chats, images, with_images: bool):
    prompts = [(chat, image if with_images else None) for chat, image in zip(chats, images)]
    extra = [(chats[1][:1], images[3]), (chats[0], images[1])]
    return prompts + [(chat, image if with_images else None) for chat, image in extra]


def _assert_alone_equals_inflight(backbone, prompts, sampling, slots, min_join=None):
    seeds = [11 * n + 1 for n in range(len(prompts))]
    decoder = InflightDecoder(backbone, sampling, slots=slots, min_join=min_join)
    joined_mid_batch = []

    def record(tag, generation):
        joined_mid_batch.append(decoder.running)

    inflight = decode_all(decoder, [Request(p, None, s) for p, s in zip(prompts, seeds)], on_done=record)
    lengths = {len(g.answer_ids) for g in inflight}
    assert len(lengths) > 1, "rows must finish at different lengths"
    assert any(joined_mid_batch), "some row must finish while others keep decoding"
    for prompt, seed, together in zip(prompts, seeds, inflight):
        (alone,) = backbone.generate([prompt], sampling, seeds=[seed])
        assert torch.equal(alone.answer_ids, together.answer_ids)
        assert torch.equal(alone.prompt_ids, together.prompt_ids)
        assert alone.text == together.text and alone.num_tokens == together.num_tokens
        torch.testing.assert_close(alone.logprobs, together.logprobs, atol=1e-5, rtol=0)
        assert alone.value == pytest.approx(together.value, abs=1e-5)
    return inflight


@pytest.mark.parametrize("with_images", [False, True], ids=["text", "image"])
def test_inflight_greedy_equals_one_at_a_time(tiny_dir, chats, images, with_images):
    backbone = _backbone(tiny_dir)
    assert supports_inflight(backbone)
    prompts = _prompts(chats, images, with_images)
    _uneven_ends(backbone, prompts, GREEDY)
    # 2 slots for 6 prompts: four of them join a batch that is already decoding
    _assert_alone_equals_inflight(backbone, prompts, GREEDY, slots=2)


@pytest.mark.parametrize("with_images", [False, True], ids=["text", "image"])
def test_inflight_seeded_sampling_equals_one_at_a_time(tiny_dir, chats, images, with_images):
    backbone = _backbone(tiny_dir)
    sampling = SamplingConfig(temperature=0.8, top_p=0.9, max_new_tokens=12)
    prompts = _prompts(chats, images, with_images)
    _uneven_ends(backbone, prompts, sampling)
    _assert_alone_equals_inflight(backbone, prompts, sampling, slots=3)


@pytest.mark.parametrize("with_images", [False, True], ids=["text", "image"])
def test_rows_join_in_groups_while_ended_rows_ride_along(tiny_dir, chats, images, with_images, monkeypatch):
    """min_join 2: a lone waiting prompt waits while two or more rows decode; the ended rows stay in the batch
    until the next join, and no answer changes."""
    backbone = _backbone(tiny_dir)
    sampling = SamplingConfig(temperature=0.8, top_p=0.9, max_new_tokens=12)
    prompts = _prompts(chats, images, with_images) * 2
    _uneven_ends(backbone, prompts, sampling)
    groups, riding = [], []
    prefill, decode = InflightDecoder._prefill, InflightDecoder._decode

    def record_prefill(self, requests):
        groups.append((len(requests), self.running))
        return prefill(self, requests)

    def record_decode(self):
        riding.append(len(self.rows) - self.running)
        return decode(self)

    monkeypatch.setattr(InflightDecoder, "_prefill", record_prefill)
    monkeypatch.setattr(InflightDecoder, "_decode", record_decode)
    _assert_alone_equals_inflight(backbone, prompts, sampling, slots=4, min_join=2)
    assert len(groups) > 2 and all(size >= 2 or live < 2 for size, live in groups)
    assert any(riding), "an ended row rides along until the next join"


def _next_turn(prompt, generation, feedback="Wrong. Try again."):
    chat, image = prompt
    return chat + [{"role": "assistant", "content": generation.text}, {"role": "user", "content": feedback}], image


@pytest.mark.parametrize("with_images", [False, True], ids=["text", "image"])
def test_row_joining_with_a_conversation_cache_equals_one_encoded_whole(tiny_dir, chats, images, with_images):
    backbone = _backbone(tiny_dir)
    prompts = _prompts(chats, images, with_images)
    _uneven_ends(backbone, prompts, GREEDY)
    first = decode_all(InflightDecoder(backbone, GREEDY, slots=3), [Request(p) for p in prompts])
    if with_images and backbone.model.config.model_type != "mllama":
        assert all(g.cache is None for g in first)  # LLaVA: image tokens inside the text, encoded whole each turn
        return
    assert all(g.cache is not None for g in first)
    second = [_next_turn(p, g) for p, g in zip(prompts, first)]
    # New conversations interleaved with continued ones, 2 slots: continued rows join mid-batch.
    requests = [r for pair in zip([Request(p, g.cache) for p, g in zip(second, first)], [Request(p) for p in prompts])
                for r in pair]
    decoder, prefilled = InflightDecoder(backbone, GREEDY, slots=2), []
    prefill = decoder._prefill
    decoder._prefill = lambda group: prefilled.append({r.cache is None for r in group}) or prefill(group)
    together = decode_all(decoder, requests)
    # New and continued prompts joining together are prefilled apart (a short continuation is not padded to a
    # whole prompt's width)
    assert len(prefilled) > 2 and all(len(kinds) == 1 for kinds in prefilled)
    for request, got in zip(requests, together):
        (whole,) = backbone.generate([request.prompt], GREEDY)
        assert torch.equal(whole.answer_ids, got.answer_ids) and torch.equal(whole.prompt_ids, got.prompt_ids)
        torch.testing.assert_close(whole.logprobs, got.logprobs, atol=1e-5, rtol=0)
        assert whole.value == pytest.approx(got.value, abs=1e-5)


def _gp_envs(count: int):
    from lit_sftrl.data.tasks import TaskConfig

    task = TaskConfig(name="gp_l", verify_iter=3)
    return [task.make_env("id") for _ in range(count)]


def test_engine_inflight_rollout_answers_are_those_decoded_alone(tiny_dir_factory):
    from lit_sftrl.training.rollout import EnvironmentPool, RolloutEngine

    backbone = _backbone(tiny_dir_factory("mllama"))
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=10)
    envs = _gp_envs(3)
    prompt = envs[0].reset(seed=0)[0]["messages"]
    _uneven_ends(backbone, [(prompt, None)] * 3, sampling)
    reported = []
    rollout = RolloutEngine(backbone, sampling).collect(
        EnvironmentPool(envs, lambda i, n: (100 * i + n, {})), 10, lambda i, k: 7 * i + k, on_attempts=reported.append
    )
    assert len(rollout.attempts) == sum(reported) == 10 and len(reported) > 1
    assert len({len(a.answer_ids) for a in rollout.attempts}) > 1
    seen = collections.Counter()
    for attempt in rollout.attempts:  # every answer is what its row decodes alone with its seed
        k, seen[attempt.env_index] = seen[attempt.env_index], seen[attempt.env_index] + 1
        (alone,) = backbone.generate([attempt.prompt], sampling, seeds=[7 * attempt.env_index + k])
        assert torch.equal(alone.answer_ids, attempt.answer_ids)
        torch.testing.assert_close(alone.logprobs, attempt.token_logprobs, atol=1e-5, rtol=0)
        assert alone.value == pytest.approx(attempt.value, abs=1e-5)


def test_engine_inflight_evaluation_equals_lockstep(tiny_dir_factory):
    from lit_sftrl.training.rollout import RolloutEngine

    backbone = _backbone(tiny_dir_factory("mllama"))
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=10)
    envs = _gp_envs(3)
    _uneven_ends(backbone, [(envs[0].reset(seed=0)[0]["messages"], None)] * 3, sampling)
    episodes = [(seed, {}) for seed in range(5)]
    results, reported = {}, []
    for decoding in ("inflight", "lockstep"):
        engine = RolloutEngine(backbone, sampling, keep_transcripts=True, decoding=decoding)
        results[decoding] = engine.evaluate(envs, episodes, on_attempts=reported.append)
    assert sum(reported) == 2 * sum(r.attempts for r in results["inflight"])
    for a, b in zip(results["inflight"], results["lockstep"]):
        assert [t.answer for t in a.transcript] == [t.answer for t in b.transcript]
        assert (a.attempts, a.success, a.episode_return) == (b.attempts, b.success, b.episode_return)


@pytest.mark.parametrize("phase", ["collect", "evaluate"])
def test_a_rollout_switches_a_training_model_to_eval_once(tiny_dir_factory, monkeypatch, phase):
    """A mode switch walks every submodule; switching there and back at every decoding step had cost 18 % of a
    rollout. The decoder holds eval mode for the whole loop (no dropout in sampling) and gives training back."""
    from lit_sftrl.training.rollout import EnvironmentPool, RolloutEngine

    backbone = _backbone(tiny_dir_factory("mllama")).train()
    switches = []
    original = backbone.model.train
    monkeypatch.setattr(backbone.model, "train", lambda mode=True: switches.append(mode) or original(mode))
    model, modes = backbone.model, []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: modes.append(model.training) or forward(*a, **k))
    engine, envs = RolloutEngine(backbone, SamplingConfig(temperature=1.0, max_new_tokens=6)), _gp_envs(2)
    if phase == "collect":
        engine.collect(EnvironmentPool(envs, lambda i, n: (100 * i + n, {})), 6, lambda i, k: 7 * i + k)
    else:
        engine.evaluate(envs, [(seed, {}) for seed in range(3)])
    assert len(modes) > 6 and not any(modes)  # every forward ran in eval mode
    assert switches == [False, True] and backbone.model.training
