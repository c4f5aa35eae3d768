"""The tiny default backbone's text: its tokenizer is trained on what the environments actually say (plus a
sample of the skills corpus that :mod:`lit_sftrl.pretraining.pretrain` trains the pretrained base on).

This module is the glue between ``envs`` (which know nothing of models) and ``models.tiny`` (which knows
nothing of environments): it plays expert and sub-optimal episodes of every task variant and hands the
prompts, answers and feedback to the tokenizer trainer.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from lit_sftrl.data.tasks import TaskConfig


def environment_corpus(episodes: int = 64, seed: int = 0) -> list[str]:
    """Prompts, expert answers, wrong answers and feedback from every task and variant (text modality, plus
    the image-modality prompts, which differ in wording)."""
    texts: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        from lit_sftrl.envs.city import STYLES, TRAIN_STYLE, VISUAL_OOD_STYLE, make_city

        # Only the text matters here: tiny panoramas keep this to a second.
        cities = {
            style: make_city(Path(tmp) / style, style, num_routes=4, seed=seed, pano_width=64) for style in STYLES
        }
        train, ood = cities[TRAIN_STYLE], cities[VISUAL_OOD_STYLE]
        tasks = [TaskConfig(name="gp_l"), TaskConfig(name="gp_vl", image_size=64)] + [
            TaskConfig(name=name, image_size=64, routes=str(train), ood_routes=str(ood))
            for name in ("virl_l", "virl_vl")
        ]
        for task in tasks:
            for variant in task.variant_names:
                env = task.make_env(variant)
                for episode in range(episodes if not task.is_virl else 4):
                    texts += _episode_text(env, seed + episode)
        for city in cities.values():  # landmark names of every style
            texts.append((Path(city) / "route_infos.json").read_text()[:20000])
    return texts


def _episode_text(env, seed: int) -> list[str]:
    obs, _ = env.reset(seed=seed)
    texts = [message["content"] for message in obs["messages"]]
    obs, _, terminated, truncated, _ = env.step(env.suboptimal_answer())
    texts += [message["content"] for message in obs["messages"][-2:]]
    if not (terminated or truncated):
        texts.append(env.expert_answer())
    return texts


TOKENIZER_SKILL_ITEMS = 3000  # skills-corpus items the tokenizer sees: ~3 chars/token on it, env text unchanged


def tokenizer_corpus(seed: int = 0) -> list[str]:
    """The one tokenizer rule of every tiny model: the environments' text plus a fixed sample of the skills
    corpus (so the pretrained base and the random-init default share tokenizer and initial weights)."""
    from lit_sftrl.pretraining.skills import SkillsConfig, corpus_texts

    return environment_corpus(seed=seed) + corpus_texts(SkillsConfig(size=TOKENIZER_SKILL_ITEMS, seed=seed))


def build_tiny(out: str | Path, family: str = "mllama", size: str = "tiny", seed: int = 0) -> Path:
    """``lit-sftrl make-tiny``: a tiny model whose tokenizer was trained on :func:`tokenizer_corpus`."""
    from lit_sftrl.models.tiny import make_tiny

    return make_tiny(Path(out), family=family, size=size, seed=seed, corpus=tokenizer_corpus(seed=seed))


def ensure_backbone(path: str) -> None:
    """Build the tiny default on first use when ``path`` is a missing ``tiny-<family>[-small]`` directory."""
    from lit_sftrl.models.tiny import TINY_NAME

    match = TINY_NAME.match(Path(path).name)
    if Path(path).exists() or match is None:
        return
    build_tiny(path, family=match["family"], size="small" if match["small"] else "tiny")
