"""The plan before a run (lit_sftrl/training/plan.py): the paper's presets parse, validate and dry-run against
Llama-3.2-11B-Vision's config.json (no weights); PPO under DeepSpeed is refused naming FSDP2; the plan's counts
match a real model's, and its memory a real step's peak RSS within a stated margin."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lit_sftrl.cli import run
from lit_sftrl.models.config import BackboneConfig, LoraSettings
from lit_sftrl.training.plan import GIB, PlanSettings, plan_run

REPO = Path(__file__).resolve().parents[1]
LLAMA_11B = REPO / "tests" / "data" / "llama-3.2-11b-vision"
PRESETS = sorted((REPO / "configs" / "paper").glob("*.yaml"))


def test_the_11b_config_is_transformers_default_mllama():
    """transformers' MllamaConfig defaults are Llama-3.2-11B-Vision's architecture; the released model's images
    are 560 pixels (the default says 448) and its text uses llama3 rope scaling."""
    from transformers import MllamaConfig

    default = MllamaConfig().to_dict()
    ours = json.loads((LLAMA_11B / "config.json").read_text())
    differ = {(part, key) for part in ("text_config", "vision_config") for key, value in ours[part].items()
              if default[part].get(key) != value}
    assert differ == {("vision_config", "image_size"), ("text_config", "rope_theta"), ("text_config", "rope_scaling")}
    plan = plan_run(LLAMA_11B, BackboneConfig(path=str(LLAMA_11B)), PlanSettings())
    assert 10.6e9 < plan.parameters < 10.7e9  # "11B": 10.67 B with the vision tower


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_paper_preset_dry_runs_on_8_gpus(preset, capsys, monkeypatch):
    from lit_sftrl.models import backbone

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(backbone.Backbone, "__init__", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(preset), "--model.init_args.backbone.path", str(LLAMA_11B), "--dry_run", "true"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "PPO on 8 device(s), sharded, activations in bfloat16" in out and "ModelParallelStrategy" in out
    peak = float(next(line for line in out.splitlines() if line.strip().startswith("peak")).split()[1])
    assert 20 < peak < 70, out  # fits an 80 GB GPU with room; unsharded it could not (next test)


def test_the_same_run_unsharded_does_not_fit_80_gb():
    settings = PlanSettings(kind="ppo", devices=8, compute_dtype="bfloat16", micro_batch=4, prompt_tokens=1024,
                            answer_tokens=512, rollout_slots=16, fused_attention=True)
    backbone = BackboneConfig(path=str(LLAMA_11B), gradient_checkpointing=True)
    replicated = plan_run(LLAMA_11B, backbone, settings)
    sharded = plan_run(LLAMA_11B, backbone, PlanSettings(**{**vars(settings), "sharding": "sharded"}))
    assert replicated.total > 160 * GIB > 80 * GIB > sharded.total
    assert replicated.rows["optimizer (AdamW)"] == pytest.approx(8 * sharded.rows["optimizer (AdamW)"])
    lora = plan_run(LLAMA_11B, BackboneConfig(path=str(LLAMA_11B), dtype="bfloat16", lora=LoraSettings()), settings)
    assert lora.total < 80 * GIB and lora.trainable < 0.01 * lora.parameters
    # The KL reference: free under LoRA (the adapter disabled); under full fine-tuning a frozen copy, sharded like
    # the model and gathered whole (in the compute dtype) to score, in a phase of its own.
    with_kl = PlanSettings(**{**vars(settings), "sharding": "sharded", "kl_reference": True})
    kl = plan_run(LLAMA_11B, backbone, with_kl)
    assert kl.rows["KL reference"] == pytest.approx(4 * replicated.parameters / 8)
    assert kl.rows["reference: whole weights"] == pytest.approx(2 * replicated.parameters)
    assert kl.total == pytest.approx(sharded.total + kl.rows["KL reference"])  # the rollout's phase is larger
    unsharded_kl = plan_run(LLAMA_11B, backbone, PlanSettings(**{**vars(with_kl), "sharding": "replicated"}))
    assert "reference: whole weights" not in unsharded_kl.rows
    lora_kl = plan_run(LLAMA_11B, BackboneConfig(path=str(LLAMA_11B), lora=LoraSettings()), with_kl)
    assert lora_kl.rows["KL reference"] == 0


def test_ppo_under_deepspeed_is_refused_in_one_line_naming_fsdp(tmp_path, monkeypatch):
    from lit_sftrl.models import backbone

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(backbone.Backbone, "__init__", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", "configs/gp_l_ppo.yaml", "--trainer.strategy", "deepspeed_stage_2",
             "--trainer.default_root_dir", str(tmp_path / "run")])
    message = str(exit_info.value.code)
    assert "\n" not in message and "PPO does not run under DeepSpeed" in message
    assert "FSDP2" in message and "configs/strategies/fsdp.yaml" in message


def test_plan_counts_a_real_model(tiny_dir_factory):
    """Parameters and LoRA adapter weights as the plan counts them = what torch and peft build."""
    from lit_sftrl.models.backbone import Backbone

    path = tiny_dir_factory("mllama")
    lora = BackboneConfig(path=str(path), lora=LoraSettings(r=4))
    real = Backbone(lora)
    plan = plan_run(path, lora, PlanSettings())
    assert plan.parameters == real.num_parameters
    assert plan.trainable == sum(p.numel() for p in real.parameters() if p.requires_grad)


@pytest.mark.slow
def test_plan_within_25_percent_of_a_real_steps_peak_rss():
    """bench/plan_memory.py in a fresh process (peak RSS only grows): ~0.7 GiB predicted for a 27 M-parameter
    model's float32 SFT step (weights, gradients, AdamW, activations of 2 x 512 tokens)."""
    out = subprocess.run([sys.executable, "-m", "bench.plan_memory"], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=300).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert 0.75 < result["measured_over_predicted"] < 1.25, result


def test_a_benchs_peak_memory_is_its_own_not_the_forking_processs():
    """Linux carries a forking process's high-water mark across exec into the child's ``ru_maxrss``: started from
    pytest late in the suite, bench.plan_memory once reported 1.61x the plan for what measures 1.15x from a shell."""
    ballast = bytearray(b"\x01") * (512 * 2**20)  # this process holds 512 MiB more when it starts the child
    probe = ("import resource; from bench.common import peak_rss_mb; "
             "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True).stdout
    own, inherited = map(float, out.split())
    assert len(ballast) and inherited > 512 and own < 256, (own, inherited)
