"""Checks on configuration values, made when a config object is built and again on the parsed CLI config.

Every size must be a positive integer and every rate a finite number in its range: a zero ``num_envs`` would
loop forever, an ``lr: .inf`` turns every weight NaN. The rules are keyed by field name, so the dataclasses
call :func:`validate` in ``__post_init__`` and the CLI applies :func:`config_problems` to the whole parsed
config at once, printing one line per problem before anything is built.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

PlainData = str | bool | int | float | None | list | dict
"""The type of free-form config fields: jsonargparse instantiates a ``{class_path, init_args}`` found inside a
``dict[str, Any]``, never inside this one (the bare ``list``/``dict`` are not parsed further)."""

class LimitExceeded(ValueError):
    """Data beyond a limit the config states (tokens per sample, image pixels...): the run stops with one line."""


class DataError(ValueError):
    """A training data file the config names holds a record that cannot be used: the run stops with one line."""


class YamlLimitExceeded(LimitExceeded):
    """A YAML text over the size or alias-expansion limit. Not a ``yaml.YAMLError``: jsonargparse drops those for
    command-line values and keeps the text as a string, so the reason would be lost."""


Rule = Callable[[Any], "str | None"]  # None when the value is fine, otherwise what is wrong


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"must be a positive integer, got {value!r}"
    return None


def nonnegative_int(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return f"must be an integer >= 0, got {value!r}"
    return None


def in_range(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Rule:
    """A finite number in [low, high] (open ends where asked; math.inf for no bound)."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"

    def rule(value: Any) -> str | None:
        if not _number(value) or not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            bounds = f"{left}{low:g}, {'inf' if math.isinf(high) else f'{high:g}'}{right}"
            return f"must lie in {bounds}, got {value!r}"
        return None

    return rule


def module_names(value: Any) -> str | None:
    """A non-empty list of non-empty module names (whether the model has them is checked when it loads)."""
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        return f"must be a non-empty list of module names (or null), got {value!r}"
    return None


POSITIVE = in_range(0.0, math.inf, low_open=True, high_open=True)
NONNEGATIVE = in_range(0.0, math.inf, high_open=True)
FRACTION = in_range(0.0, 1.0)

# The ceilings of the sizes that allocate memory in proportion, far above anything the paper or these configs
# use; docs/reliability.md lists them. Checked on the parsed config, before any model is built.
CEILINGS: dict[str, int] = {
    "max_new_tokens": 32_768,  # tokens generated per answer (the paper: 512); sets the key/value cache's length
    "max_tokens": 262_144,  # tokens in one training sample
    "max_turn_chars": 1_000_000,  # characters in one turn of a data file, checked before it is tokenised
    "max_image_bytes": 1 << 30,  # bytes of one image file, checked (os.stat) before it is opened
    "max_image_pixels": 400_000_000,  # pixels one image may declare in its header
    "batch_size": 4_096, "num_envs": 4_096, "rollout_steps": 65_536, "micro_batch_size": 4_096,
    "minibatch_size": 1 << 20, "image_size": 4_096, "value_head_hidden": 65_536, "max_milestones": 100_000,
    "val_episodes": 1_000_000, "test_episodes": 1_000_000, "image_tokens": 65_536,
}

# Field name -> rule, for every config dataclass and module argument of the project (PPO's included). A None
# value passes where the field is optional (the default then applies).
RULES: dict[str, Rule] = {
    # sizes
    "batch_size": positive_int, "num_envs": positive_int, "rollout_steps": positive_int,
    "max_new_tokens": positive_int, "verify_iter": positive_int, "chunk": positive_int,
    "val_episodes": nonnegative_int, "test_episodes": positive_int, "image_size": positive_int,
    "target": positive_int, "ppo_epochs": positive_int, "minibatch_size": positive_int,
    "micro_batch_size": positive_int, "r": positive_int, "alpha": positive_int, "value_head_hidden": positive_int,
    "max_nonfinite_losses": positive_int, "warmup_steps": nonnegative_int, "num_workers": nonnegative_int,
    "max_tokens": positive_int, "max_image_pixels": positive_int, "max_milestones": positive_int,
    "max_turn_chars": positive_int, "max_image_bytes": positive_int, "group_size": positive_int,
    # rates
    "lr": POSITIVE, "weight_decay": NONNEGATIVE, "min_lr_ratio": FRACTION,
    "dropout": in_range(0.0, 1.0, high_open=True), "temperature": NONNEGATIVE,
    "top_p": in_range(0.0, 1.0, low_open=True), "multi_turn": FRACTION,
    "gamma": FRACTION, "gae_lambda": FRACTION, "clip_eps": POSITIVE, "value_clip": NONNEGATIVE,
    "value_coef": NONNEGATIVE, "entropy_coef": NONNEGATIVE, "kl_coef": NONNEGATIVE, "max_grad_norm": NONNEGATIVE,
    "thought_coef": FRACTION, "value_lr_scale": POSITIVE, "buffer_ratio": NONNEGATIVE, "image_tokens": nonnegative_int,
    # names
    "modules_to_save": module_names,
}


def with_ceiling(rule: Rule, ceiling: int) -> Rule:
    """``rule``, and no larger than ``ceiling``."""

    def checked(value: Any) -> str | None:
        return rule(value) or (f"must be at most {ceiling:,} (its ceiling), got {value:,}" if value > ceiling else None)

    return checked


RULES.update({name: with_ceiling(RULES[name], ceiling) for name, ceiling in CEILINGS.items()})
FINITE = in_range(-math.inf, math.inf, low_open=True, high_open=True)


def value_problems(values: Iterable[tuple[str, Any]], prefix: str = "") -> list[tuple[str, str]]:
    """(key, what is wrong) for each named value that breaks its rule; any other float must be finite."""
    problems = []
    for name, value in values:
        if value is None:
            continue
        rule = RULES.get(name)
        if rule is None and isinstance(value, float):
            rule = FINITE
        if rule is None and name == "betas" and isinstance(value, (list, tuple)):
            rule = _betas
        message = rule(value) if rule else None
        if message:
            problems.append((f"{prefix}{name}", message))
    return problems


def _betas(value: Any) -> str | None:
    bad = [b for b in value if in_range(0.0, 1.0, high_open=True)(b)]
    return f"each must lie in [0, 1), got {list(value)!r}" if bad or len(value) != 2 else None


def validate(config: Any, name: str | None = None) -> None:
    """Raise ValueError listing every broken rule of a dataclass instance, one ``key: problem`` per line."""
    prefix = f"{name}." if name else ""
    problems = value_problems(((f.name, getattr(config, f.name)) for f in dataclasses.fields(config)), prefix)
    if problems:
        raise ValueError("\n".join(f"{key}: {message}" for key, message in problems))


def check_values(prefix: str = "", **values: Any) -> None:
    """Raise ValueError listing every named value that breaks its rule (module arguments, not dataclasses)."""
    problems = value_problems(values.items(), prefix)
    if problems:
        raise ValueError("\n".join(f"{key}: {message}" for key, message in problems))


def plain_data_problems(value: Any, key: str) -> list[tuple[str, str]]:
    """Where ``value`` holds anything but JSON-like data, or a ``class_path`` that something might instantiate."""
    if isinstance(value, dict):
        if "class_path" in value:
            return [(key, "holds a 'class_path': free-form settings are plain data, nothing is instantiated from them")]
        return [p for k, v in value.items() for p in plain_data_problems(v, f"{key}.{k}")]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in plain_data_problems(v, f"{key}[{i}]")]
    if value is None or isinstance(value, (str, bool, int)):
        return []
    if isinstance(value, float):
        return [] if math.isfinite(value) else [(key, f"must be a finite number, got {value!r}")]
    return [(key, f"must be plain data (str, number, bool, list, dict), got a {type(value).__name__}")]


def check_plain_data(value: Any, key: str) -> None:
    problems = plain_data_problems(value, key)
    if problems:
        raise ValueError("\n".join(f"{k}: {m}" for k, m in problems))


def config_problems(node: Any, prefix: str) -> list[tuple[str, str]]:
    """Walk a parsed config (a jsonargparse Namespace or dicts) and apply :data:`RULES` to every leaf by its
    name; ``init_args`` levels are left out of the reported keys (``data.num_envs``, as users write them)."""
    node = _plain(node)
    if not isinstance(node, dict):
        return []
    problems = []
    for name, value in node.items():
        if name in ("class_path", "__path__") or name.startswith("_"):
            continue
        if name in ("env_kwargs", "variants"):  # free-form keyword arguments: plain data, no rules by name
            problems += plain_data_problems(value, f"{prefix}{name}")
        elif isinstance(value, dict):
            problems += config_problems(value, prefix if name == "init_args" else f"{prefix}{name}.")
        else:
            problems += value_problems([(name, value)], prefix)
    return problems


def _plain(value: Any) -> Any:
    """A jsonargparse Namespace as dicts (what the config file said)."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return value


# ----------------------------------------------------------------------------------------------- YAML limits

MAX_YAML_CHARS = 1 << 20  # a config is a few KB; anything near this size is a mistake or an attack
MAX_YAML_NODES = 100_000  # nodes after alias expansion: nested aliases ("billion laughs") grow exponentially


_unlimited_yaml_load: Callable[[str], Any] | None = None  # jsonargparse's own loader, once the limits wrap it


def limited_yaml_load(stream: str) -> Any:
    """jsonargparse's YAML loader behind two limits: the text's size, and its size once aliases are expanded
    (checked on the composed node graph, where an alias is one shared node, before anything is built)."""
    import yaml
    from jsonargparse._loaders_dumpers import get_yaml_default_loader, yaml_load

    if isinstance(stream, str) and len(stream) > MAX_YAML_CHARS:
        raise YamlLimitExceeded(f"a config of {len(stream):,} characters is refused (the limit is {MAX_YAML_CHARS:,})")
    if isinstance(stream, str) and "*" in stream:
        node = yaml.compose(stream, Loader=get_yaml_default_loader())
        if node is not None and _expanded_nodes(node, {}, set()) > MAX_YAML_NODES:
            raise YamlLimitExceeded(f"a config whose aliases expand to more than {MAX_YAML_NODES:,} values is refused")
    return (_unlimited_yaml_load or yaml_load)(stream)


def read_yaml_file(path: str | os.PathLike) -> Any:
    """A YAML file under the same limits, its size checked (``os.stat``) before a byte is read: a 3 GB file named
    as a config used to be read whole before the size check. Raises ValueError naming the file."""
    import yaml

    size = os.stat(path).st_size
    if size > MAX_YAML_CHARS:
        raise ValueError(f"{path}: a YAML file of {size:,} bytes is refused (the limit is {MAX_YAML_CHARS:,})")
    with open(path, encoding="utf-8", errors="replace") as file:
        text = file.read(MAX_YAML_CHARS + 1)
    try:
        return limited_yaml_load(text)
    except (yaml.YAMLError, YamlLimitExceeded) as error:
        raise ValueError(f"{path}: {str(error).splitlines()[0]}") from None


def _expanded_nodes(node: Any, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Values ``node`` stands for once every alias is copied out; shared nodes are counted once per use."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:  # an alias inside its own anchor: an endless structure
        return MAX_YAML_NODES + 1
    open_nodes.add(key)
    children = node.value if isinstance(node.value, list) else []
    total = 1
    for child in children:
        parts = child if isinstance(child, tuple) else (child,)  # mappings hold (key, value) pairs
        for part in parts:
            total += _expanded_nodes(part, sizes, open_nodes)
            if total > MAX_YAML_NODES:
                break
    open_nodes.discard(key)
    sizes[key] = total
    return total


def install_yaml_limits() -> None:
    """Put every YAML jsonargparse parses behind :func:`limited_yaml_load`: config files (``set_loader``) and
    command-line values (``--data.init_args.task.env_kwargs '...'`` goes through the module's ``yaml_load``
    directly: an alias bomb there ran 88 s and took 4 GB), and check a config file's size before reading it."""
    global _unlimited_yaml_load
    from jsonargparse import _loaders_dumpers, _paths, set_loader
    from jsonargparse._loaders_dumpers import get_loader_exceptions

    set_loader("yaml", limited_yaml_load, (*get_loader_exceptions("yaml"), YamlLimitExceeded))
    if _unlimited_yaml_load is None:
        _unlimited_yaml_load = _loaders_dumpers.yaml_load
        _loaders_dumpers.yaml_load = limited_yaml_load
        _paths.Path.get_content = _size_checked(_paths.Path.get_content)


def _size_checked(get_content: Callable[..., str]) -> Callable[..., str]:
    """jsonargparse's ``Path.get_content``, refusing a local file over :data:`MAX_YAML_CHARS` bytes before reading
    it (a 3 GB ``--config`` was read whole, then refused by its length)."""
    import functools

    @functools.wraps(get_content)
    def checked(self: Any, mode: str = "r") -> str:
        local = not (self._std_io or self._is_url or self._is_fsspec)
        if local and (size := os.stat(self._absolute).st_size) > MAX_YAML_CHARS:
            raise YamlLimitExceeded(f"{self._relative}: a config of {size:,} bytes is refused without reading it "
                                 f"(the limit is {MAX_YAML_CHARS:,})")
        return get_content(self, mode)

    return checked


def config_value(config: Any, dotted: str) -> Any:
    """``config``'s value at ``dotted`` (``"data.task.name"``) through namespaces, dicts or attributes; None where a
    level is missing: what the checks before a run read from a parsed config."""
    value = config
    for part in dotted.split("."):
        if value is None:
            return None
        value = value.get(part) if hasattr(value, "get") else getattr(value, part, None)
    return value
