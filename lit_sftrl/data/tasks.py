"""The study's four tasks and their evaluation variants, as environment constructor arguments.

A task (GP-L, GP-VL, V-IRL-L, V-IRL-VL) plus a variant (``id``, ``rule_ood``, ``visual_ood``) fully determines
which environment is built and how. This is the one place that knows the paper's splits:

* GeneralPoints: id = J/Q/K count 10, black suits; rule_ood = J/Q/K count 11/12/13; visual_ood = red suits.
* V-IRL: id = training city, absolute actions; rule_ood = same city, relative actions;
  visual_ood = another city (the paper: NYC vs the nine-city VLN mini benchmark).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym

from lit_sftrl.core.validation import PlainData, check_plain_data, validate
from lit_sftrl.envs import GENERAL_POINTS_ID, VIRL_ID
from lit_sftrl.envs.base import ChatEnv
from lit_sftrl.envs.images import MAX_IMAGE_PIXELS
from lit_sftrl.envs.routes import MAX_MILESTONES

TaskName = Literal["gp_l", "gp_vl", "virl_l", "virl_vl"]
Variant = Literal["id", "rule_ood", "visual_ood"]
VARIANTS: tuple[str, ...] = ("id", "rule_ood", "visual_ood")


@dataclass
class TaskConfig:
    """Which environment to train and evaluate on.

    Args:
        name: ``gp_l`` / ``gp_vl`` (GeneralPoints, text / image) or ``virl_l`` / ``virl_vl`` (V-IRL).
        verify_iter: attempts per prompt before the episode (GP) or rail point (V-IRL) fails;
            ``None`` keeps the environment's default (paper: 5 for GP, 2 for V-IRL).
        image_size: side of the square observation image in pixels (paper: 1200 for GP; tiny models want 224).
        target: the GeneralPoints target number.
        routes: V-IRL route folder for training, id and rule_ood (official on-disk format).
        ood_routes: V-IRL route folder for visual_ood.
        env_kwargs: any further environment keyword arguments (e.g. ``{"drop_rate": 0.0}``, or
            ``{"sampling": "deck"}`` for GeneralPoints hands of distinct cards); plain data only, a ``class_path``
            inside is refused, never instantiated.
        templates: replacement wording, template key -> text with named fields (``{cards}``, ``{target}``,
            ``{instructions}``, ``{history}``, ...; the keys and fields are the environment's
            ``DEFAULT_TEMPLATES`` / ``TEMPLATE_FIELDS``), e.g. the prompts a released checkpoint was trained on.
            Applies to every variant; the environment still judges answers the same way.
        max_milestones: V-IRL: the most milestones one route may have (the official routes have fewer than 30; a
            route of 10,000 exhausted the memory); a route folder with a longer one is refused, naming it.
        max_image_pixels: V-IRL-VL: the most pixels a panorama file may declare in its header, checked before
            decoding (a 140 KB file can declare 12000 x 12000 pixels, 432 MB decoded).
    """

    name: TaskName = "gp_l"
    verify_iter: int | None = None
    image_size: int = 224
    target: int = 24
    routes: str = "data/virl/metro"
    ood_routes: str = "data/virl/harbor"
    env_kwargs: dict[str, PlainData] | None = None  # not dict[str, Any]: jsonargparse would instantiate class_paths
    templates: dict[str, str] | None = None
    max_milestones: int = MAX_MILESTONES
    max_image_pixels: int = MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        validate(self, "task")
        check_plain_data(self.env_kwargs, "task.env_kwargs")

    @property
    def is_visual(self) -> bool:
        return self.name.endswith("_vl")

    @property
    def is_virl(self) -> bool:
        return self.name.startswith("virl")

    @property
    def variants(self) -> tuple[str, ...]:
        """The evaluation variants that apply: visual_ood only for image tasks."""
        return VARIANTS if self.is_visual else VARIANTS[:2]

    def check_variant(self, variant: str) -> None:
        if variant not in self.variants:
            raise ValueError(
                f"variant {variant!r} does not apply to task {self.name!r}; choose one of {list(self.variants)}"
            )

    def env_spec(self, variant: str = "id") -> tuple[str, dict[str, Any]]:
        """The gymnasium id and keyword arguments of this task's environment for ``variant``."""
        self.check_variant(variant)
        kwargs: dict[str, Any] = {"modality": "image" if self.is_visual else "text"}
        if self.is_visual:
            kwargs["image_size"] = self.image_size
        if self.verify_iter is not None:
            kwargs["verify_iter"] = self.verify_iter
        if self.is_virl:
            env_id = VIRL_ID
            kwargs["routes"] = self.ood_routes if variant == "visual_ood" else self.routes
            kwargs["action_space"] = "relative" if variant == "rule_ood" else "absolute"
            kwargs["max_milestones"], kwargs["max_image_pixels"] = self.max_milestones, self.max_image_pixels
        else:
            env_id = GENERAL_POINTS_ID
            kwargs["target"] = self.target
            kwargs["face_card_rule"] = "11-13" if variant == "rule_ood" else "10"
            kwargs["suits"] = "red" if variant == "visual_ood" else "black"
        if self.templates:
            kwargs["templates"] = dict(self.templates)
        kwargs.update(self.env_kwargs or {})
        return env_id, kwargs

    def route_folders(self) -> list[str]:
        """The V-IRL route folders this task reads (empty for GeneralPoints)."""
        if not self.is_virl:
            return []
        return [self.routes, self.ood_routes] if self.is_visual else [self.routes]

    def prepare(self) -> None:
        """Generate the synthetic cities on first use; a missing folder that is no known style is an error."""
        for folder in self.route_folders():
            ensure_routes(folder)

    def make_env(self, variant: str = "id", **overrides: Any) -> ChatEnv:
        """Build the environment for ``variant`` (unwrapped: the rollout engine needs ``expert_answer``)."""
        env_id, kwargs = self.env_spec(variant)
        return make_env_from_spec(env_id, {**kwargs, **overrides})


# The paper's D_buffer / D_RL ratio (lambda) per environment, for compute accounting in its "paper" mode.
PAPER_BUFFER_RATIOS = {GENERAL_POINTS_ID: 6.0, VIRL_ID: 5.1}


def paper_buffer_ratio(env_id: str) -> float:
    if env_id not in PAPER_BUFFER_RATIOS:
        raise ValueError(f"no paper buffer ratio for {env_id!r}; set model.compute.buffer_ratio")
    return PAPER_BUFFER_RATIOS[env_id]


def make_env_from_spec(env_id: str, kwargs: dict[str, Any]) -> ChatEnv:
    """Build a registered environment, unwrapped: the rollout engine drives it directly."""
    return gym.make(env_id, disable_env_checker=True, **kwargs).unwrapped


def ensure_routes(folder: str) -> Path:
    """Return ``folder``; generate it when it is missing and named after a synthetic city style."""
    from lit_sftrl.envs.city import DEFAULT_ROUTES, STYLES, ensure_city

    path = Path(folder)
    if (path / "route_infos.json").exists():
        return path
    if path.name in STYLES:
        return ensure_city(path, style=path.name, num_routes=DEFAULT_ROUTES[path.name], seed=0)
    raise FileNotFoundError(
        f"route folder {folder!r} does not exist (no route_infos.json). Point it at a folder in the official "
        f"V-IRL format, or name it after a synthetic style ({', '.join(STYLES)}) to have it generated."
    )
