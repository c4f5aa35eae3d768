"""Peak memory and time of scoring a micro-batch's answer tokens: the plain full-vocabulary log-softmax against
the chunked form PPO uses (:func:`lit_sftrl.models.sampling.sampled_log_probs`): ``python -m bench.scoring_memory``.

The step is the scoring tail of a PPO micro-batch: final hidden states [batch, tokens, hidden] through an output
layer [vocab, hidden] to logits, log-prob of each sampled token and the mean entropy, then the backward of
``-(sum of log-probs) - 0.01 x entropy`` into the hidden states and the output layer. The defaults are
SmolLM2-135M's shapes (hidden 576, vocabulary 49,152) at GP-L's micro-batch (16 answers of 64 tokens). Each form
runs in its own process; its peak is the peak RSS of the step (VmHWM, reset just before it) less the process's
RSS just before the step (after imports and inputs), so the two are compared on what the step itself adds.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from lit_sftrl.models.sampling import masked_log_probs, sampled_log_probs

FORMS = ("plain", "chunked")


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def _reset_peak() -> None:
    """Start the process's peak RSS (VmHWM) afresh, so an earlier peak (imports) cannot hide the step's."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _peak_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def step(form: str, batch: int, tokens: int, hidden: int, vocab: int) -> dict[str, float]:
    """One scoring forward + backward in this process; its added peak RSS (MB) and seconds."""
    torch.manual_seed(0)
    states = torch.randn(batch, tokens, hidden, requires_grad=True)
    output_layer = torch.nn.Linear(hidden, vocab, bias=False)
    targets = torch.randint(0, vocab, (batch, tokens))
    suppressed = torch.zeros(vocab, dtype=torch.bool)
    suppressed[:8] = True
    before = _rss_mb()
    _reset_peak()
    start = time.perf_counter()
    logits = output_layer(states)
    if form == "plain":
        logp = masked_log_probs(logits, 0.6, suppressed)
        chosen, entropy = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)
    else:
        chosen, entropy = sampled_log_probs(logits, targets, 0.6, suppressed)
    (-chosen.sum() - 0.01 * entropy.mean()).backward()
    seconds = time.perf_counter() - start
    peak = _peak_mb()
    return {"form": form, "added_peak_mb": peak - before, "seconds": seconds,
            "logits_mb": batch * tokens * vocab * 4 / 2**20}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=65, help="answer tokens + 1 (the prompt's last position)")
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats per form")
    parser.add_argument("--form", choices=FORMS, help="run one form in this process (what the parent calls)")
    args = parser.parse_args(argv)
    shape = [str(v) for v in ("--batch", args.batch, "--tokens", args.tokens, "--hidden", args.hidden,
                              "--vocab", args.vocab)]
    if args.form:
        print(json.dumps(step(args.form, args.batch, args.tokens, args.hidden, args.vocab)))
        return
    results = {}
    for form in FORMS:
        out = subprocess.run([sys.executable, "-m", "bench.scoring_memory", "--form", form, *shape],
                             check=True, capture_output=True, text=True).stdout
        results[form] = json.loads(out.strip().splitlines()[-1])
    print(f"batch {args.batch} x {args.tokens} positions, vocabulary {args.vocab:,}: logits "
          f"{results['plain']['logits_mb']:.0f} MB in fp32")
    for form, result in results.items():
        print(f"{form:>8}: step adds {result['added_peak_mb']:7.0f} MB peak RSS")
    print(f"peak ratio plain / chunked: {results['plain']['added_peak_mb'] / results['chunked']['added_peak_mb']:.2f}x")
    # Time side by side in this process, interleaved, best of --repeats: a shared machine's slow spells hit both.
    best = {form: float("inf") for form in FORMS}
    for _ in range(args.repeats):
        for form in FORMS:
            best[form] = min(best[form], step(form, args.batch, args.tokens, args.hidden, args.vocab)["seconds"])
    print(f"seconds (best of {args.repeats}, interleaved): plain {best['plain']:.2f}, chunked {best['chunked']:.2f}, "
          f"chunked / plain {best['chunked'] / best['plain']:.2f}x")


if __name__ == "__main__":
    main()
