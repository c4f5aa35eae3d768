"""The plan against a real step: ``python -m bench.plan_memory [--layers 6 --hidden 512 --tokens 512 --batch 2]``.

Builds a randomly initialised Mllama from a config (no weights on disk), runs two SFT steps on text (forward over
``--batch`` sequences of ``--tokens`` tokens, cross-entropy on every position, backward, AdamW step) in float32 on
the CPU, and prints the process's peak resident anonymous memory above what it held before the model existed
(sampled every millisecond; file-backed pages such as torch's own libraries are not the run's state), beside what
:mod:`lit_sftrl.training.plan` predicts for the same shape (weights + gradients + AdamW + activations).
Run each measurement in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import torch

from lit_sftrl.models.config import BackboneConfig
from lit_sftrl.training.plan import GIB, PlanSettings, plan_run
from lit_sftrl.training.sft import sft_loss


def mllama_config(layers: int, hidden: int, vocab: int) -> dict:
    """A small Mllama (text decoder of ``layers`` layers, one of them cross-attention, a tiny vision tower)."""
    return {
        "model_type": "mllama",
        "text_config": {
            "model_type": "mllama_text_model", "vocab_size": vocab, "hidden_size": hidden,
            "intermediate_size": hidden * 11 // 4, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
            "num_key_value_heads": hidden // 128, "cross_attention_layers": [layers // 2],
            "tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        },
        "vision_config": {
            "model_type": "mllama_vision_model", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_global_layers": 1, "attention_heads": 2, "image_size": 56,
            "patch_size": 14, "max_num_tiles": 1, "vision_output_dim": 128, "intermediate_layers_indices": [0],
            "supported_aspect_ratios": [[1, 1]],
        },
    }


def anonymous_bytes() -> int:
    """Resident anonymous memory (tensors, allocator arenas), without file-backed pages such as torch's libraries.

    Not ``getrusage``'s ``ru_maxrss``: Linux carries the high-water mark of the process that forked this one across
    ``exec``, so a bench started from a large process (pytest, late in the suite) reported that process's size
    as its own peak: 1.15x the plan when started from a shell, 1.61x from the whole suite."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no RssAnon line (Linux only)")


class PeakSampler:
    """The highest :func:`anonymous_bytes` seen, sampled every millisecond on a thread while the block runs."""

    def __enter__(self) -> PeakSampler:
        self.peak, self._running = anonymous_bytes(), True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, anonymous_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, anonymous_bytes())


def measure(model_dir: Path, batch: int, tokens: int) -> float:
    """Peak growth of resident anonymous memory (bytes) over two SFT steps of a freshly built, randomly
    initialised model."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(model_dir)
    input_ids = torch.randint(1, config.text_config.vocab_size, (batch, tokens))
    before = anonymous_bytes()
    with PeakSampler() as sampler:
        model = AutoModelForImageTextToText.from_config(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        for _ in range(2):  # the second step's backward runs with AdamW's states allocated: the steady state
            logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
            sft_loss(logits[:, :-1], input_ids[:, 1:]).backward()
            del logits
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as between micro-batches
    return sampler.peak - before


def predict(model_dir: Path, batch: int, tokens: int) -> float:
    # torch's CPU attention kernel (SDPA) does not keep the attention probabilities for the backward
    settings = PlanSettings(kind="sft", micro_batch=batch, prompt_tokens=tokens - 1, answer_tokens=1,
                            fused_attention=True)
    return plan_run(model_dir, BackboneConfig(path=str(model_dir)), settings).total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        (model_dir / "config.json").write_text(json.dumps(mllama_config(args.layers, args.hidden, args.vocab)))
        predicted = predict(model_dir, args.batch, args.tokens)
        measured = measure(model_dir, args.batch, args.tokens)
    result = {"predicted_gib": round(predicted / GIB, 4), "measured_gib": round(measured / GIB, 4),
              "measured_over_predicted": round(measured / predicted, 3)}
    print(json.dumps({**vars(args), **result}))


if __name__ == "__main__":
    main()
