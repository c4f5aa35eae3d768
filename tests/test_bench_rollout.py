"""``bench/rollout.py`` keeps measuring what the README reports: every mode plays the same episodes, the rows and
their targets are there, and its timing wrappers leave the model's behaviour alone."""

from __future__ import annotations

import torch

from bench import rollout as bench
from lit_sftrl.models import Backbone, BackboneConfig, SamplingConfig


def test_every_mode_plays_the_same_episodes_and_the_rows_are_complete(tiny_dir_factory):
    # Per-row seeded sampling: one at a time, lockstep and in-flight give the very same answers.
    runs = bench.measure(tiny_dir_factory("mllama"), num_envs=2, episodes=3, max_new_tokens=3)
    assert set(runs) == set(bench.MODES)
    for run in runs.values():
        assert run.episodes == 3 and run.attempts == len(run.answers) and run.answers == runs["in-flight"].answers
        assert 0 < run.model_seconds < run.seconds and run.parts["steps"] > 0
    assert len(runs["in-flight"].lengths) == runs["in-flight"].attempts
    rows = {row.name: row for row in bench.rows_of(runs)}
    assert rows["rollout GP-L, in-flight: fraction of the ceiling"].target == 90.0
    assert rows["rollout GP-L, in-flight: model share of time"].target == 85.0
    assert rows["rollout GP-L, ceiling: one at a time / in-flight decoding steps"].value > 0
    assert 0 <= rows["rollout GP-L, PPO micro-batches: padded tokens grouped by length"].value <= 100
    # the same micro-batches packed never pad more than in the layout before packing
    before = rows["rollout GP-L, PPO micro-batches: padded tokens as drawn, unpacked layout (before)"].value
    assert before >= rows["rollout GP-L, PPO micro-batches: padded tokens as drawn"].value
    bounds = [rows[f"rollout GP-L, in-flight: fraction of the {name}"].value
              for name in ("ceiling", "forward-time bound (steps + prefill)")]
    assert 0 < bounds[0] <= bounds[1]
    # no engine beats its steps plus the prompt tokens it cannot skip at their cheapest: a bound at or above what
    # this one reached
    reachable = rows["rollout GP-L, any engine: highest fraction of the ceiling "
                     "(unskippable prompt tokens at their cheapest)"]
    assert bounds[0] <= reachable.value <= 100
    inflight = runs["in-flight"]
    prefilled = sum(prefill.tokens for prefill in inflight.prefills)
    # the first prompts are new, the second turns continue their conversations' caches
    assert {prefill.continued for prefill in inflight.prefills} == {False, True}
    assert all(inflight.seconds_per_prompt_token(continued=kind) > 0 for kind in (False, True))
    assert 0 < prefilled <= sum(prompt for prompt, _ in inflight.lengths)  # continued turns prefill new tokens only
    assert 0 < inflight.tokens_to_prefill <= prefilled
    assert 0 < inflight.prefill_floor <= inflight.parts["prefill"]


def test_fewest_prompt_tokens_share_prefixes_and_skip_what_decoding_fed():
    # two episodes opening alike: their shared first two tokens are prefilled once
    assert bench.fewest_prompt_tokens([([1, 2, 3], [9]), ([1, 2, 4], [9])]) == 4
    # a conversation's next prompt holds the answer: the tokens decoding fed (all but the last) are not prefilled
    # again, the last answer token and the feedback are
    first = ([1, 2, 3], [7, 8, 0])
    assert bench.fewest_prompt_tokens([first, ([1, 2, 3, 7, 8, 0, 5], [9])]) == 3 + 2
    # an answer re-tokenised differently inside the next prompt must be prefilled from where it differs
    assert bench.fewest_prompt_tokens([first, ([1, 2, 3, 7, 6, 0, 5], [9])]) == 3 + 3


def test_instrumented_backbone_generates_what_a_plain_one_does(tiny_dir_factory, chats):
    """The timing wrappers change nothing the model computes, left-padded rows continued from caches included
    (a wrapper that hid the forward's signature once cost those rows their position ids)."""
    path = str(tiny_dir_factory("mllama"))
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=6)
    plain = Backbone(BackboneConfig(path=path)).eval()
    timed = Backbone(BackboneConfig(path=path)).eval()
    timers = bench.instrument(timed)
    prompts = [(chat, None) for chat in chats]  # different lengths: left padding
    caches = {id(timed): [None] * len(prompts), id(plain): [None] * len(prompts)}
    for turn in range(2):
        results = {}
        for backbone in (timed, plain):
            results[id(backbone)] = backbone.generate(prompts, greedy, caches[id(backbone)])
            caches[id(backbone)] = [g.cache for g in results[id(backbone)]]
        for a, b in zip(results[id(timed)], results[id(plain)]):
            assert torch.equal(a.answer_ids, b.answer_ids) and torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
        prompts = [(chat + [{"role": "assistant", "content": g.text}, {"role": "user", "content": "Again."}], None)
                   for (chat, _), g in zip(prompts, results[id(plain)])]
    assert timers.seconds["backbone"] > 0 and timers.seconds["prefill"] > 0 and timers.seconds["steps"] > 0
