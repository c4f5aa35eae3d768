"""Conversation caches: a conversation continued from its cached keys and values gets exactly what encoding it
whole gives (answers, log-probs, values), while the model runs only the new tokens."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from lit_sftrl.models import Backbone, BackboneConfig, SamplingConfig
from lit_sftrl.models.kv_cache import ConversationCache, GrowingLayer
from lit_sftrl.training.rollout import EnvironmentPool, RolloutEngine

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=8)


def test_reusable_is_the_common_prefix_short_of_the_last_token():
    cache = ConversationCache(torch.tensor([5, 6, 7, 8]), layers=[])
    assert cache.reusable(torch.tensor([5, 6, 7, 8, 9, 10])) == 4
    assert cache.reusable(torch.tensor([5, 6, 9, 8, 9])) == 2  # an answer that re-tokenised differently
    assert cache.reusable(torch.tensor([5, 6, 7, 8])) == 3  # the last token's forward starts the answer
    assert cache.reusable(torch.tensor([5, 6])) == 1
    assert cache.reusable(torch.tensor([1, 6, 7])) == 0


def test_growing_layer_holds_what_concatenation_holds():
    growing, plain = GrowingLayer(capacity=6), DynamicLayer()
    torch.manual_seed(0)
    for length in (4, 1, 1, 3, 1):  # prefill, decoding steps, and growth past the capacity
        keys, values = torch.randn(2, 3, length, 5), torch.randn(2, 3, length, 5)
        got, expected = growing.update(keys, values), plain.update(keys, values)
        assert all(torch.equal(g, e) for g, e in zip(got, expected))
    assert growing.get_seq_length() == plain.get_seq_length() == 10
    # Something outside update (beam reordering) replaces the keys: the layer follows them.
    for layer in (growing, plain):
        layer.batch_select_indices(torch.tensor([1]))
    keys = torch.randn(1, 3, 1, 5)
    assert all(torch.equal(g, e) for g, e in zip(growing.update(keys, keys), plain.update(keys, keys)))


def _forward_widths(backbone: Backbone) -> list[int]:
    """Records how many columns each multi-token forward of the model runs (prefills)."""
    widths: list[int] = []
    forward = backbone.model.forward

    @functools.wraps(forward)  # generate reads the forward's signature: keep it
    def recording(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            widths.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    backbone.model.forward = recording
    return widths


def _assert_same_generations(got, expected):
    for a, b in zip(got, expected):
        assert torch.equal(a.answer_ids, b.answer_ids) and torch.equal(a.prompt_ids, b.prompt_ids)
        assert torch.allclose(a.logprobs, b.logprobs, atol=1e-4)
        assert a.value == pytest.approx(b.value, abs=1e-4)
        assert a.num_tokens == b.num_tokens  # the paper's accounting: the whole prompt, cached or not


def _next_turn(prompt, generation, feedback="Wrong. Try again."):
    chat, image = prompt
    return chat + [{"role": "assistant", "content": generation.text}, {"role": "user", "content": feedback}], image


@pytest.mark.parametrize("with_images", [False, True], ids=["text", "image"])
def test_continued_conversations_equal_whole_encodings(tiny_dir, chats, images, with_images):
    backbone = Backbone(BackboneConfig(path=str(tiny_dir), value_head=True)).eval()
    torch.nn.init.normal_(backbone.value_head.net[-1].weight, std=0.5)  # V = 0 at init would compare nothing
    first = [(chat, image if with_images else None) for chat, image in zip(chats, images)]
    turn1 = backbone.generate(first, GREEDY, caches=[None] * len(first))
    if with_images and backbone.model.config.model_type != "mllama":
        # Image tokens inside the text (LLaVA-like): image prompts are always encoded whole.
        assert all(g.cache is None for g in turn1)
        return
    assert all(g.cache is not None and len(g.cache.token_ids) > len(g.prompt_ids) for g in turn1)

    second = [_next_turn(prompt, g) for prompt, g in zip(first, turn1)]
    # Row 1 starts over (no cache); row 2 gets another conversation's cache (only a shared prefix is reusable).
    caches = [turn1[0].cache, None, turn1[3].cache, turn1[3].cache]
    widths = _forward_widths(backbone)
    continued = backbone.generate(second, GREEDY, caches=caches)
    whole = backbone.generate(second, GREEDY)
    _assert_same_generations(continued, whole)
    assert widths[0] < widths[1]  # the continued batch prefilled fewer columns than the whole one

    # All rows continued: the prefill is as wide as the most new tokens of a row.
    widths.clear()
    continued = backbone.generate(second, GREEDY, caches=[g.cache for g in turn1])
    _assert_same_generations(continued, whole)
    longest = max(len(g.prompt_ids) for g in whole)
    assert widths[0] < longest / 2

    # A third turn continues from the second's caches; values of states alone (bootstrapping) too.
    third = [_next_turn(prompt, g, "Still wrong.") for prompt, g in zip(second, continued)]
    _assert_same_generations(
        backbone.generate(third, GREEDY, caches=[g.cache for g in continued]), backbone.generate(third, GREEDY)
    )
    values = backbone.prompt_values(third, caches=[g.cache for g in continued])
    assert torch.allclose(values, backbone.prompt_values(third), atol=1e-4)


def test_a_changed_image_is_encoded_whole(tiny_dir_factory, chats, images):
    """Mllama's text tokens see the image through cross-attention: another image means nothing is reusable."""
    backbone = Backbone(BackboneConfig(path=str(tiny_dir_factory("mllama")))).eval()
    first = [(chats[0], images[0]), (chats[1], images[1])]
    turn1 = backbone.generate(first, GREEDY, caches=[None, None])
    second = [_next_turn((chats[0], images[2]), turn1[0]), _next_turn((chats[1], images[1].copy()), turn1[1])]
    widths = _forward_widths(backbone)
    continued = backbone.generate(second, GREEDY, caches=[g.cache for g in turn1])
    _assert_same_generations(continued, backbone.generate(second, GREEDY))
    assert widths[0] == len(continued[0].prompt_ids)  # row 0 was encoded whole; row 1 (an equal copy) was not
    assert turn1[1].cache.continues(images[1].copy()) and not turn1[0].cache.continues(images[2])


def test_caches_only_when_asked_and_enabled(tiny_dir_factory, chats):
    path = str(tiny_dir_factory("mllama"))
    backbone = Backbone(BackboneConfig(path=path)).eval()
    prompts = [(chat, None) for chat in chats[:2]]
    assert all(g.cache is None for g in backbone.generate(prompts, GREEDY))  # a one-off call keeps nothing
    off = Backbone(BackboneConfig(path=path, cache_conversations=False)).eval()
    assert all(g.cache is None for g in off.generate(prompts, GREEDY, caches=[None, None]))


@pytest.mark.parametrize("modality", ["text", "image"])
def test_rollouts_with_and_without_conversation_caches_agree(tiny_dir_factory, modality):
    """The engine hands each conversation its cache; greedy rollouts come out the same either way."""
    from lit_sftrl.envs.general_points import GeneralPointsEnv

    path = str(tiny_dir_factory("mllama"))
    results = {}
    for cached in (True, False):
        torch.manual_seed(0)  # the same value head both times
        backbone = Backbone(BackboneConfig(path=path, value_head=True, cache_conversations=cached)).eval()
        torch.nn.init.normal_(backbone.value_head.net[-1].weight, std=0.5)
        widths = _forward_widths(backbone)
        envs = [GeneralPointsEnv(modality=modality, verify_iter=3, image_size=64) for _ in range(3)]
        pool = EnvironmentPool(envs, lambda index, number: (100 * index + number, {}))
        attempts = RolloutEngine(backbone, GREEDY).collect(pool, 8, lambda index, k: 0).attempts
        results[cached] = attempts, widths
    (cached, cached_widths), (plain, plain_widths) = results[True], results[False]
    for a, b in zip(cached, plain):
        assert torch.equal(a.answer_ids, b.answer_ids)
        assert torch.allclose(a.token_logprobs, b.token_logprobs, atol=1e-4)
        assert a.value == pytest.approx(b.value, abs=1e-4)
        assert a.bootstrap_value == pytest.approx(b.bootstrap_value, abs=1e-4)
        assert (a.terminated, a.truncated) == (b.terminated, b.truncated)
    assert any(a.truncated for a in cached)
    # Revision turns and bootstrapping prefilled only their new tokens.
    assert sum(cached_widths[1:]) < sum(plain_widths[1:]) / 2
