"""Scoring without a full-vocabulary log-softmax of the batch: the chunked form equals the plain one (values and
gradients, 1e-5), whatever the chunk, temperature or suppressed tokens; the scoring forward uses it."""

import pytest
import torch

from lit_sftrl.models.sampling import masked_log_probs, sampled_log_probs


def plain(logits, targets, temperature, suppressed):
    logp = masked_log_probs(logits, temperature, suppressed)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("rows_per_chunk", [1, 7, 256])
@pytest.mark.parametrize("temperature", [0.6, 1.0, 0.0])
def test_chunked_log_probs_and_entropy_match_the_plain_form_with_their_gradients(rows_per_chunk, temperature):
    torch.manual_seed(0)
    batch, width, vocab = 3, 5, 50
    suppressed = torch.zeros(vocab, dtype=torch.bool)
    suppressed[[0, 7, 49]] = True
    targets = torch.randint(1, 7, (batch, width))  # never a suppressed token: those are never sampled
    weights_chosen, weights_entropy = torch.randn(batch, width), torch.randn(batch, width)
    results = []
    for form in (plain, lambda *a: sampled_log_probs(*a, rows_per_chunk=rows_per_chunk)):
        logits = (3 * torch.randn(batch, width, vocab, generator=torch.Generator().manual_seed(1))).requires_grad_()
        chosen, entropy = form(logits, targets, temperature, suppressed)
        ((chosen * weights_chosen).sum() + (entropy * weights_entropy).sum()).backward()
        results.append((chosen.detach(), entropy.detach(), logits.grad))
    for expected, got in zip(*results):
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()
    assert results[1][2][..., suppressed].abs().max() == 0  # no gradient reaches a suppressed token


def test_half_precision_logits_get_fp32_results_and_gradients_in_their_own_dtype():
    logits = torch.randn(2, 3, 40).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 40, (2, 3))
    suppressed = torch.zeros(40, dtype=torch.bool)
    chosen, entropy = sampled_log_probs(logits, targets, 1.0, suppressed)
    expected_chosen, expected_entropy = plain(logits.detach(), targets, 1.0, suppressed)
    assert chosen.dtype == entropy.dtype == torch.float32
    assert torch.allclose(chosen, expected_chosen, atol=1e-5) and torch.allclose(entropy, expected_entropy, atol=1e-5)
    chosen.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_scoring_goes_through_the_chunked_form(tiny_dir_factory, monkeypatch):
    from lit_sftrl.models import backbone as backbone_module

    model = backbone_module.Backbone(backbone_module.BackboneConfig(path=str(tiny_dir_factory("mllama"))))
    calls = []
    original = backbone_module.sampled_log_probs

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(backbone_module, "sampled_log_probs", counting)
    prompts = [([{"role": "user", "content": "Say 7."}], None)] * 2
    answers = [torch.tensor([5, 6, 7]), torch.tensor([8])]
    scores = model.score(prompts, answers, temperature=0.6)
    assert len(calls) == 1 and [len(lp) for lp in scores.token_logprobs] == [3, 1]
    scores.logprob_sum.sum().backward()  # gradients flow through the custom backward into the model
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_the_chunked_form_adds_less_peak_memory_than_the_plain_one():
    """bench/scoring_memory.py at a third of SmolLM2's vocabulary, each form in its own process."""
    import json
    import subprocess
    import sys

    shape = ["--batch", "16", "--tokens", "65", "--hidden", "64", "--vocab", "16384"]
    peaks = {}
    for form in ("plain", "chunked"):
        out = subprocess.run([sys.executable, "-m", "bench.scoring_memory", "--form", form, *shape],
                             check=True, capture_output=True, text=True).stdout
        peaks[form] = json.loads(out.splitlines()[-1])["added_peak_mb"]
    assert peaks["chunked"] < 0.6 * peaks["plain"], peaks  # measured: 177 MB against 403 MB
