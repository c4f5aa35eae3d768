"""Every shipped config and overlay goes the way a user's run goes: ``--print_config``, then a fit from the printed
file (tiny sizes by overrides, no evaluation), with the project's config checks running on it; a config whose
variant does not fit its task is refused before any model is built, in one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lit_sftrl.cli import run
from lit_sftrl.cli import trainer as trainer_cli

REPO = Path(__file__).resolve().parents[1]
# configs/ also holds a tool's config, which fit does not read: tests/test_pretrain.py runs it through its command
# (test_config_file_and_overrides reads configs/pretrain_base.yaml, test_smoke_through_the_cli runs make-tiny,
# test_the_rules_preset_is_the_base_recipe_weighted_towards_rule_skills runs configs/pretrain_rules.yaml).
TOOL_CONFIGS = {"pretrain_base", "pretrain_rules"}
BASES = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.stem not in TOOL_CONFIGS)
# configs/paper/ (the paper's 8-GPU runs) and configs/strategies/ (overlays for any config) are tested in
# tests/test_plan.py and tests/test_sharded.py; configs/study/ (lit-sftrl study's configs) in tests/test_study.py.
OVERLAYS = sorted(p for p in (REPO / "configs").glob("*/**/*.yaml")
                  if p.parent.name not in ("paper", "strategies", "study"))


def base_of(overlay: Path) -> Path:
    return REPO / "configs" / ("_".join(overlay.stem.split("_")[:3]) + ".yaml")  # gp_l_ppo_verify3 -> gp_l_ppo


CASES = {p.stem: [p] for p in BASES} | {f"{p.parent.name}/{p.stem}": [base_of(p), p] for p in OVERLAYS}
TINY = {  # a few seconds per fit; the trainer, callbacks, logger and model stay the config's own
    "sft": ["--trainer.max_steps", "2", "--data.init_args.batch_size", "2"],
    "ppo": ["--trainer.max_epochs", "1", "--data.init_args.num_envs", "2", "--data.init_args.rollout_steps", "4",
            "--model.init_args.ppo.ppo_epochs", "1", "--model.init_args.ppo.minibatch_size", "4",
            "--model.init_args.ppo.micro_batch_size", "2", "--model.init_args.sampling.max_new_tokens", "8"],
}
NO_EVALUATION = ["--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
                 "--trainer.log_every_n_steps", "1"]


@pytest.fixture(scope="module")
def cities(tmp_path_factory) -> list[str]:
    """Small synthetic cities in place of the configs' data/virl ones (1,000 routes, generated on first use)."""
    from lit_sftrl.envs.city import make_city

    root = tmp_path_factory.mktemp("cities")
    return ["--data.init_args.task.routes", str(make_city(root / "metro", "metro", 6, seed=0, pano_width=64)),
            "--data.init_args.task.ood_routes", str(make_city(root / "harbor", "harbor", 3, seed=0, pano_width=64))]


def print_config(configs: list[Path], capsys, out: Path) -> Path:
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", *[a for config in configs for a in ("--config", str(config))], "--print_config"])
    assert exit_info.value.code in (0, None), f"{configs} do not parse"
    out.write_text(capsys.readouterr().out)
    return out


def test_every_config_and_overlay_is_covered():
    assert len(BASES) >= 8 and {p.stem for p in OVERLAYS} >= {"gp_l_ppo_from_base", "gp_l_sft_multi_turn"}
    assert all(base_of(p).is_file() for p in OVERLAYS)


@pytest.mark.slow
@pytest.mark.parametrize("configs", CASES.values(), ids=CASES.keys())
def test_printed_config_fits(configs, tmp_path, capsys, monkeypatch, tiny_dir_factory, cities):
    monkeypatch.chdir(REPO)  # the configs' relative paths are relative to the repository
    printed = print_config(configs, capsys, tmp_path / "printed.yaml")
    found = []
    check = trainer_cli.config_problems
    monkeypatch.setattr(trainer_cli, "config_problems", lambda config: found.append(check(config)) or found[-1])
    kind = "ppo" if "ppo" in configs[0].stem else "sft"
    run_dir = tmp_path / "run"
    cli = run(["fit", "--config", str(printed), "--trainer.default_root_dir", str(run_dir),
               "--model.init_args.backbone.path", str(tiny_dir_factory("mllama")), *TINY[kind], *NO_EVALUATION,
               *(cities if "virl" in configs[0].stem else [])])
    assert found == [[]]  # the project's checks ran on the printed config and found nothing
    assert cli.trainer.global_step >= 1 and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.csv").is_file()


def test_a_config_with_a_variant_its_task_lacks_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    from lit_sftrl.models import backbone

    monkeypatch.chdir(REPO)
    config = yaml.safe_load(print_config([REPO / "configs/gp_l_ppo.yaml"], capsys, tmp_path / "printed.yaml")
                            .read_text())
    config["data"]["init_args"]["variant"] = "visual_ood"  # GP-L has no images
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setattr(backbone.Backbone, "__init__", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(tmp_path / "wrong.yaml"), "--trainer.default_root_dir", str(tmp_path / "run")])
    header, *problems = str(exit_info.value.code).splitlines()
    assert header == "lit-sftrl fit: the config has problems, nothing was run:"
    assert problems == ["  data.variant: variant 'visual_ood' does not apply to task 'gp_l'; "
                        "choose one of ['id', 'rule_ood']"]
    assert not (tmp_path / "run").exists()
