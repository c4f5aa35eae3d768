"""Which environment a run trains and evaluates on: a preset of the study, or any environment the user names.

A task is an environment (a registered gymnasium id, or an import path ``package.module:Class``) plus its
keyword arguments and its **variants**, named keyword sets: ``id`` is trained on, every variant is evaluated.
The study's four tasks (GP-L, GP-VL, V-IRL-L, V-IRL-VL) are presets of that same mechanism, and this is the one
place that knows the paper's splits:

* GeneralPoints: id = J/Q/K count 10, black suits; rule_ood = J/Q/K count 11/12/13; visual_ood = red suits.
* V-IRL: id = training city, absolute actions; rule_ood = same city, relative actions;
  visual_ood = another city (the paper: NYC vs the nine-city VLN mini benchmark).

What an environment must give the trainer is written in :mod:`lit_sftrl.envs.contract`, which checks it.
Nothing named in a config is imported until an environment is built.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
from gymnasium.envs.registration import load_env_creator

from lit_sftrl.core.validation import PlainData, check_plain_data, validate
from lit_sftrl.data.episodes import Wrapping
from lit_sftrl.envs import GENERAL_POINTS_ID, VIRL_ID
from lit_sftrl.envs.base import ChatEnv
from lit_sftrl.envs.contract import ContractError, check_env
from lit_sftrl.envs.images import MAX_IMAGE_PIXELS
from lit_sftrl.envs.routes import MAX_MILESTONES

PRESETS: tuple[str, ...] = ("gp_l", "gp_vl", "virl_l", "virl_vl")
VARIANTS: tuple[str, ...] = ("id", "rule_ood", "visual_ood")  # the presets' variants, in the paper's order
TRAIN_VARIANT = "id"  # the variant trained on (in distribution); every variant is evaluated
VARIANT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")  # it becomes a metric key (val/<variant>/success)


@dataclass
class WrapperConfig:
    """A gymnasium wrapper put around the environment, e.g. to shape its reward.

    Args:
        wrapper: import path ``package.module:Class`` of a ``gymnasium.Wrapper`` subclass (called with the
            environment first, then ``kwargs``); imported only when an environment is built. (Not ``class_path``:
            jsonargparse would import and instantiate that itself while parsing.)
        kwargs: its keyword arguments; plain data only.
        apply_to_eval: wrap the evaluation environments too (default: training only, so that evaluation
            measures the environment's own task).
    """

    wrapper: str
    kwargs: dict[str, PlainData] | None = None
    apply_to_eval: bool = False

    def __post_init__(self) -> None:
        check_import_path(self.wrapper, "task.wrappers.wrapper")
        check_plain_data(self.kwargs, "task.wrappers.kwargs")


@dataclass
class TaskConfig:
    """Which environment to train and evaluate on.

    Args:
        name: a preset, ``gp_l`` / ``gp_vl`` (GeneralPoints, text / image) or ``virl_l`` / ``virl_vl`` (V-IRL);
            with ``env`` set, your task's name in evaluation records and reports (default: the ``env`` string).
        env: your own environment instead of a preset: a registered gymnasium id (``MyEnv-v0``, or
            ``my_pkg:MyEnv-v0`` to import the module that registers it) or an import path ``my_pkg.envs:MyEnv``
            (a class or function; the current directory is searched first, as ``python -m`` does).
        variants: named keyword sets, one per variant: ``{id: {...}, harder: {...}}``. ``id`` is trained on;
            every variant is evaluated. With ``env``: default ``{id: {}}``. With a preset: added to its variants
            (a same name replaces the preset's). Plain data only.
        wrappers: gymnasium wrappers around the training environments (and evaluation's, with ``apply_to_eval``),
            innermost first: reward shaping without editing the environment.
        verify_iter: attempts per prompt before the episode (GP) or rail point (V-IRL) fails;
            ``None`` keeps the environment's default (paper: 5 for GP, 2 for V-IRL).
        image_size: preset setting: side of the square observation image in pixels (paper: 1200 for GP; tiny
            models want 224).
        target: preset setting: the GeneralPoints target number.
        routes: preset setting: V-IRL route folder for training, id and rule_ood (official on-disk format).
        ood_routes: preset setting: V-IRL route folder for visual_ood.
        env_kwargs: keyword arguments for every variant, applied last (e.g. ``{"drop_rate": 0.0}``, or
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

    name: str | None = None
    env: str | None = None
    variants: dict[str, dict[str, PlainData]] | None = None
    wrappers: list[WrapperConfig] | None = None
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
        check_plain_data(self.variants, "task.variants")
        if self.env is None:
            self.name = self.name or PRESETS[0]
            if self.name not in PRESETS:
                raise ValueError(f"task.name: {self.name!r} is not a preset ({', '.join(PRESETS)}); to train on "
                                 "your own environment, name it in task.env")
        else:
            check_import_path(self.env, "task.env", gym_id_allowed=True)
            self.name = self.name or self.env
        self.wrappers = [w if isinstance(w, WrapperConfig) else WrapperConfig(**w) for w in self.wrappers or []]
        for name, kwargs in (self.variants or {}).items():
            if not isinstance(name, str) or not VARIANT_NAME.fullmatch(name):
                raise ValueError(f"task.variants: {name!r} is not a usable variant name (a letter, then letters, "
                                 "digits, '_' or '-'; it names metrics such as val/<variant>/success)")
            if not isinstance(kwargs, dict):
                raise ValueError(f"task.variants.{name}: must be a dict of keyword arguments, got {kwargs!r}")
            shared = sorted(set(kwargs) & set(self.env_kwargs or {}))
            if shared:
                raise ValueError(f"task.variants.{name}.{shared[0]}: also set in task.env_kwargs, which applies to "
                                 "every variant and would override it; set it in one place")
        if TRAIN_VARIANT not in self.variant_kwargs():
            raise ValueError(f"task.variants: no {TRAIN_VARIANT!r} variant (the one trained on) among "
                             f"{list(self.variant_names)}")

    @property
    def is_preset(self) -> bool:
        return self.env is None

    @property
    def is_visual(self) -> bool:
        return self.is_preset and self.name.endswith("_vl")

    @property
    def is_virl(self) -> bool:
        return self.is_preset and self.name.startswith("virl")

    @property
    def env_id(self) -> str:
        """The gymnasium id or import path of the environment."""
        if self.is_preset:
            return VIRL_ID if self.is_virl else GENERAL_POINTS_ID
        return self.env

    @property
    def variant_names(self) -> tuple[str, ...]:
        """The variants, in evaluation order: the presets' visual_ood only for image tasks."""
        return tuple(self.variant_kwargs())

    def variant_kwargs(self) -> dict[str, dict[str, Any]]:
        """Variant name -> its own keyword arguments, in evaluation order (its position seeds its episodes)."""
        own = {name: dict(kwargs) for name, kwargs in (self.variants or {}).items()}
        return {**self._preset_variants(), **own} if self.is_preset else (own or {TRAIN_VARIANT: {}})

    def _preset_variants(self) -> dict[str, dict[str, Any]]:
        """The paper's splits as keyword sets: visual_ood only for image tasks."""
        if self.is_virl:
            variants = {"id": {"routes": self.routes, "action_space": "absolute"},
                        "rule_ood": {"routes": self.routes, "action_space": "relative"},
                        "visual_ood": {"routes": self.ood_routes, "action_space": "absolute"}}
        else:
            variants = {"id": {"face_card_rule": "10", "suits": "black"},
                        "rule_ood": {"face_card_rule": "11-13", "suits": "black"},
                        "visual_ood": {"face_card_rule": "10", "suits": "red"}}
        return {name: variants[name] for name in (VARIANTS if self.is_visual else VARIANTS[:2])}

    def _shared_kwargs(self) -> dict[str, Any]:
        """Keyword arguments every variant gets before its own: the presets' settings, and verify_iter."""
        kwargs: dict[str, Any] = {}
        if self.is_preset:
            kwargs["modality"] = "image" if self.is_visual else "text"
            if self.is_visual:
                kwargs["image_size"] = self.image_size
        if self.verify_iter is not None:
            kwargs["verify_iter"] = self.verify_iter
        if self.is_virl:
            kwargs["max_milestones"], kwargs["max_image_pixels"] = self.max_milestones, self.max_image_pixels
        elif self.is_preset:
            kwargs["target"] = self.target
        return kwargs

    def check_variant(self, variant: str) -> None:
        if variant not in self.variant_kwargs():
            raise ValueError(
                f"variant {variant!r} does not apply to task {self.name!r}; choose one of {list(self.variant_names)}"
            )

    def env_spec(self, variant: str = TRAIN_VARIANT) -> tuple[str, dict[str, Any]]:
        """The environment (gymnasium id or import path) and keyword arguments of ``variant``: the shared ones,
        the variant's own, the templates, then ``env_kwargs``."""
        self.check_variant(variant)
        kwargs = {**self._shared_kwargs(), **self.variant_kwargs()[variant]}
        if self.templates:
            kwargs["templates"] = dict(self.templates)
        kwargs.update(self.env_kwargs or {})
        return self.env_id, kwargs

    def wrapping(self, evaluation: bool = False) -> Wrapping:
        """The wrappers of training environments, or (``evaluation``) those marked ``apply_to_eval``."""
        return tuple((w.wrapper, dict(w.kwargs or {})) for w in self.wrappers
                     if w.apply_to_eval or not evaluation)

    def check_contract(self, expert: bool = False, suboptimal: bool = False) -> None:
        """Build every variant's environment as a run builds it (the training variant with the training wrappers,
        the others with evaluation's) and check it against :mod:`lit_sftrl.envs.contract`; ContractError, one line,
        at the first break. ``expert`` / ``suboptimal``: SFT plays the training variant's expert (multi-turn)."""
        for variant in self.variant_names:
            label = f"{self.env_id} (variant {variant!r})"
            env_id, kwargs = self.env_spec(variant)
            try:
                env = make_env_from_spec(env_id, kwargs, self.wrapping(evaluation=variant != TRAIN_VARIANT))
            except Exception as error:  # noqa: BLE001 - the user's code: any failure is reported in one line
                raise ContractError(" ".join(f"{label}: building it raised {type(error).__name__}: {error}".split()))
            training = variant == TRAIN_VARIANT
            check_env(env, label, expert=expert and training, suboptimal=suboptimal and training)

    def route_folders(self) -> list[str]:
        """The V-IRL route folders this task reads (empty for any other environment)."""
        if not self.is_virl:
            return []
        return [self.routes, self.ood_routes] if self.is_visual else [self.routes]

    def prepare(self) -> None:
        """Generate the synthetic cities on first use; a missing folder that is no known style is an error."""
        for folder in self.route_folders():
            ensure_routes(folder)

    def make_env(self, variant: str = TRAIN_VARIANT, **overrides: Any) -> ChatEnv:
        """Build the environment for ``variant``, unwrapped (expert play and the route count read its methods)."""
        env_id, kwargs = self.env_spec(variant)
        return make_env_from_spec(env_id, {**kwargs, **overrides})


# The paper's D_buffer / D_RL ratio (lambda) per environment, for compute accounting in its "paper" mode.
PAPER_BUFFER_RATIOS = {GENERAL_POINTS_ID: 6.0, VIRL_ID: 5.1}


def paper_buffer_ratio(env_id: str) -> float:
    if env_id not in PAPER_BUFFER_RATIOS:
        raise ValueError(f"no paper buffer ratio for {env_id!r}; set model.compute.buffer_ratio")
    return PAPER_BUFFER_RATIOS[env_id]


def is_import_path(name: str) -> bool:
    """``package.module:Attribute`` (an object to call), as opposed to a gymnasium id such as ``MyEnv-v0`` or
    ``my_pkg:MyEnv-v0`` (gymnasium imports ``my_pkg``, which registers the id)."""
    module, _, attribute = name.partition(":")
    return attribute.isidentifier() and all(part.isidentifier() for part in module.split("."))


def check_import_path(name: Any, key: str, gym_id_allowed: bool = False) -> None:
    if not isinstance(name, str) or not name or (not gym_id_allowed and not is_import_path(name)):
        expected = "a gymnasium id or " if gym_id_allowed else ""
        raise ValueError(f"{key}: {name!r} is not {expected}an import path 'package.module:Name'")


def load_user_object(path: str) -> Any:
    """The object an import path names. The current directory comes first on ``sys.path`` (as for ``python -m``),
    so ``examples.own_env.reverse:ReverseEnv`` resolves from the repository root under the console script too."""
    _current_directory_on_path()
    try:
        return load_env_creator(path)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import {path!r}: {type(error).__name__}: {error}") from None


def _current_directory_on_path() -> None:
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


def make_env_from_spec(env_id: str, kwargs: dict[str, Any], wrappers: Wrapping = ()) -> ChatEnv:
    """Build an environment, unwrapped (the rollout engine drives it directly), then put ``wrappers`` around it."""
    if is_import_path(env_id):
        env = load_user_object(env_id)(**kwargs)
    else:
        _current_directory_on_path()  # gymnasium's my_pkg:MyEnv-v0 imports my_pkg, which registers the id
        env = gym.make(env_id, disable_env_checker=True, **kwargs).unwrapped
    for wrapper, kwargs in wrappers:
        env = load_user_object(wrapper)(env, **kwargs)
    return env


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
