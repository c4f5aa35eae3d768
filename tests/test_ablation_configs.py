"""The paper's other experiments are overlays on a task's config; each composes with its base and changes what
it says it changes (run directory included, so ablation runs never overwrite each other)."""

from pathlib import Path

import pytest
import yaml

from lit_sftrl.cli import run

OVERLAYS = sorted(Path("configs/ablations").glob("*.yaml"))


def base_of(overlay: Path) -> Path:
    return Path("configs") / ("_".join(overlay.stem.split("_")[:3]) + ".yaml")  # gp_l_ppo_verify3 -> gp_l_ppo


def resolved(capsys, *configs: Path) -> dict:
    args = ["fit"] + [item for config in configs for item in ("--config", str(config))] + ["--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        run(args)
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_there_are_overlays_for_every_recipe():
    names = {overlay.stem for overlay in OVERLAYS}
    assert {f"gp_l_ppo_verify{v}" for v in (1, 3, 5, 10)} | {"gp_l_ppo_from_base", "gp_l_sft_multi_turn"} <= names


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_overlay_composes_with_its_base(overlay, capsys):
    config = resolved(capsys, base_of(overlay), overlay)
    base = resolved(capsys, base_of(overlay))
    assert config["trainer"]["default_root_dir"] == f"checkpoints/{overlay.stem}"
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == f"checkpoints/{overlay.stem}"
    # Everything the overlay does not name stays as in the base config (equal compute for the ablations).
    assert config["data"]["init_args"]["rollout_steps" if "ppo" in overlay.stem else "batch_size"] == (
        base["data"]["init_args"]["rollout_steps" if "ppo" in overlay.stem else "batch_size"]
    )
    assert config["model"] == base["model"]
    if "verify" in overlay.stem:
        assert config["data"]["init_args"]["task"]["verify_iter"] == int(overlay.stem.split("verify")[1])
    if "multi_turn" in overlay.stem:
        assert config["data"]["init_args"]["multi_turn"] == 0.5
