"""From Lightning checkpoints to backbones and standard Hugging Face directories.

Checkpoint contract (the SFT and PPO LightningModules follow it): ``ckpt["hyper_parameters"]["backbone"]``
holds the :class:`BackboneConfig` (dataclass or dict) and ``ckpt["state_dict"]`` holds the backbone's
``trainable_state_dict()`` with every key prefixed by ``"backbone."``. Frozen weights come from
``config.path``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from lit_sftrl.models.backbone import Backbone
from lit_sftrl.models.config import (
    BackboneConfig,
    LoraSettings,
    SamplingConfig,
    as_backbone_config,
)
from lit_sftrl.models.loading import check_model_directory, is_gguf, load_plain_model
from lit_sftrl.models.processors import save_processor
from lit_sftrl.models.weights import VALUE_HEAD_PREFIX, copy_by_canonical_name, merge_lora_state, merged_state_dict

log = logging.getLogger(__name__)
PREFIX = "backbone."
EXPORT_RECORD = "lit_sftrl_export.json"
_SAFE_CLASSES = [BackboneConfig, LoraSettings, SamplingConfig]
# Checkpoints up to this size get every zip member's CRC verified before use (~4 GB/s); bigger ones only the
# structural check (zip directory, pickle, keys), which catches truncation but not flipped bytes in tensors.
CRC_CHECK_LIMIT = 8 << 30


class UnsafeCheckpointError(ValueError):
    """A checkpoint whose pickle names code beyond tensors and plain data: loading it could run that code."""


def _torch_load(path: Path, mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` and nothing else, ever: a pickle that names any other global
    (``builtins.exec``, ``subprocess.Popen``...) would run it, and torch's own block list covers few modules.
    lit-sftrl writes plain data only (hyper-parameters are dicts), so none of its checkpoints needs more."""
    try:
        with torch.serialization.safe_globals(_SAFE_CLASSES):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        # Any refusal of torch's weights-only unpickler (a global, an operand or a class it does not allow) is a
        # pickle asking for more than data, not damage: said so, instead of "truncated or corrupted".
        text = str(error).lower()
        if not any(sign in text for sign in ("unsupported global", "not an allowed global", "weights only load")):
            raise
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        name = f" ({found.group(1)})" if found else ""
        raise UnsafeCheckpointError(
            f"checkpoint {str(path)!r} is refused: it holds objects beyond tensors and plain data{name}, and "
            "loading it could run code; lit-sftrl never writes such files"
        ) from None


def read_lightning_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """Load a Lightning checkpoint file; FileNotFoundError/ValueError naming the file instead of a deep traceback.

    ``mmap=True`` maps the tensors instead of reading them: a cheap check that the file is whole (its zip
    directory and pickle read back) before a run starts, whatever the checkpoint's size.
    """
    path = Path(path)
    if is_distributed_checkpoint(path):
        return _read_distributed_checkpoint(path, weights=not mmap)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        checkpoint = _torch_load(path, mmap=mmap)
    except UnsafeCheckpointError:
        raise
    except Exception as error:  # truncated zip, garbage bytes, foreign pickle...
        raise ValueError(f"checkpoint {str(path)!r} is truncated or corrupted ({_first_line(error)})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{str(path)!r} is not a Lightning checkpoint (no state_dict)")
    if "backbone" not in (checkpoint.get("hyper_parameters") or {}):
        raise ValueError(f"checkpoint {str(path)!r} has no hyper_parameters['backbone']: not written by lit-sftrl?")
    return checkpoint


def check_lightning_checkpoint(path: str | Path, crc_limit: int = CRC_CHECK_LIMIT) -> None:
    """Raise FileNotFoundError/ValueError naming ``path`` unless it reads back whole: a zip archive (what
    ``torch.save`` writes; a truncated file has lost its directory), every member's CRC intact (files up to
    ``crc_limit`` bytes), and a Lightning checkpoint of lit-sftrl once unpickled (tensors mapped, not read)."""
    path = Path(path)
    if is_distributed_checkpoint(path):  # its record (meta.pt) here; the shards when read (a missing one names it)
        checkpoint = _read_distributed_checkpoint(path, weights=False)
        if "backbone" not in (checkpoint.get("hyper_parameters") or {}):
            raise ValueError(f"checkpoint {str(path)!r} has no hyper_parameters['backbone']: not written by lit-sftrl?")
        return
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"checkpoint {str(path)!r} is truncated or corrupted (not a whole zip archive, which torch.save writes)"
        )
    if path.stat().st_size <= crc_limit:
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except Exception as error:  # noqa: BLE001 - any failure to read it back means the file is damaged
            raise ValueError(f"checkpoint {str(path)!r} is truncated or corrupted ({_first_line(error)})") from None
        if bad is not None:
            raise ValueError(f"checkpoint {str(path)!r} is corrupted (its part {bad!r} fails the CRC check)")
    read_lightning_checkpoint(path, mmap=True)


DISTRIBUTED_RECORD = "meta.pt"  # what Lightning writes beside the shards: everything but weights and optimizer


def is_distributed_checkpoint(path: str | Path) -> bool:
    """A sharded run's checkpoint (``ModelParallelStrategy``): a directory of shards (``__<rank>_0.distcp``), their
    index (``.metadata``) and the rest of the Lightning checkpoint (``meta.pt``)."""
    path = Path(path)
    return path.is_dir() and (path / DISTRIBUTED_RECORD).is_file() and (path / ".metadata").is_file()


class _IndexUnpickler(pickle.Unpickler):
    """torch reads a distributed checkpoint's index (``.metadata``) with plain ``pickle.load``, which would run
    whatever code a crafted file names. This reads it first naming only what torch's own index holds (its
    checkpoint metadata classes, sizes, dtypes, layouts, memory formats, paths), so a file naming anything else is
    refused before torch (or Lightning's resume) opens it."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            module.startswith("torch.distributed.checkpoint.")
            or (module, name) in {("torch", "Size"), ("torch.serialization", "_get_layout"),
                                  ("collections", "OrderedDict"), ("pathlib", "PosixPath"),
                                  ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath")}
            or (module == "torch" and isinstance(getattr(torch, name, None),
                                                 (torch.dtype, torch.layout, torch.memory_format)))
        )
        if not allowed:
            raise UnsafeCheckpointError(f"its index names {module}.{name}, which loading would run")
        return super().find_class(module, name)


def _check_distributed_index(path: Path) -> None:
    index = path / ".metadata"
    try:
        with index.open("rb") as handle:
            _IndexUnpickler(handle).load()
    except UnsafeCheckpointError as error:
        raise UnsafeCheckpointError(f"checkpoint {str(path)!r} is refused: {error}; lit-sftrl never writes such "
                                    "files") from None
    except Exception as error:  # cut short, not a pickle
        raise ValueError(f"checkpoint {str(path)!r} is truncated or corrupted (its index: {_first_line(error)})"
                         ) from None


def _read_distributed_checkpoint(path: Path, weights: bool = True) -> dict[str, Any]:
    """A distributed checkpoint as one Lightning checkpoint dict, in this process (no process group): its record,
    and with ``weights`` its whole ``state_dict`` gathered from every shard (the optimizer state is not read).
    Its state_dict holds the whole module (a sharded run saves every weight, trainable or not), under the same
    ``"backbone."`` names as a single-process checkpoint's trainable weights."""
    _check_distributed_index(path)
    checkpoint = _read_safely(path / DISTRIBUTED_RECORD)
    if not weights:
        checkpoint["state_dict"] = {}
        return checkpoint
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    try:
        _load_state_dict(state, storage_reader=FileSystemReader(path), no_dist=True,
                         planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}))
    except Exception as error:  # a missing or cut shard
        raise ValueError(f"checkpoint {str(path)!r} is truncated or corrupted ({_first_line(error)})") from None
    checkpoint["state_dict"] = {k: v for k, v in state["state_dict"].items() if k.startswith(PREFIX)}
    return checkpoint


def _read_safely(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        return _torch_load(path)
    except UnsafeCheckpointError:
        raise
    except Exception as error:
        raise ValueError(f"checkpoint {str(path)!r} is truncated or corrupted ({_first_line(error)})") from None


def _first_line(error: Exception, limit: int = 160) -> str:
    """``Type: message``, the message cut to its first sentence: torch appends paragraphs of advice."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    message = message.split(". ")[0]
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _backbone_config(checkpoint: dict[str, Any]) -> BackboneConfig:
    config = checkpoint["hyper_parameters"]["backbone"]
    if hasattr(config, "as_dict"):  # a jsonargparse Namespace
        config = config.as_dict()
    return as_backbone_config(config)


def pack_state(backbone: Backbone) -> dict[str, torch.Tensor]:
    """A checkpoint's ``state_dict``: the backbone's trainable weights under the ``"backbone."`` prefix."""
    return {PREFIX + k: v for k, v in backbone.trainable_state_dict().items()}


def unpack_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What :func:`pack_state` packed, by the backbone's own parameter names."""
    return {k[len(PREFIX) :]: v for k, v in state_dict.items() if k.startswith(PREFIX)}


def _backbone_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    return unpack_state(checkpoint["state_dict"])


def load_backbone_from_lightning_checkpoint(path: str | Path, **overrides: Any) -> Backbone:
    """The backbone of an SFT or PPO run, trained weights loaded. ``overrides`` replace BackboneConfig fields
    (e.g. ``path=`` when the base directory moved, ``quantization="none"``, ``value_head=False``)."""
    return _backbone_from(read_lightning_checkpoint(path), path, **overrides)


def _backbone_from(checkpoint: dict[str, Any], path: str | Path, **overrides: Any) -> Backbone:
    config = dataclasses.replace(_backbone_config(checkpoint), **overrides)
    backbone = Backbone(config)
    state = _backbone_state(checkpoint)
    if backbone.value_head is None:
        state = {k: v for k, v in state.items() if not k.startswith(VALUE_HEAD_PREFIX)}
    try:
        backbone.load_trainable_state_dict(state, strict=True)
    except ValueError as error:
        raise ValueError(f"checkpoint {str(path)!r}: {error}") from None
    return backbone


def export_checkpoint(ckpt: str | Path, out: str | Path, merge_lora: bool = True) -> Path:
    """Write a Lightning checkpoint as a standard Hugging Face directory (LoRA merged unless ``merge_lora=False``:
    then the peft adapter alone); ``value_head.safetensors`` beside it when the run had one. QLoRA runs are
    reloaded unquantised first, so the export is a plain float model."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"export directory {str(out)!r} is not empty")
    check_lightning_checkpoint(ckpt)  # torch.load itself does not notice damaged tensor bytes
    checkpoint = read_lightning_checkpoint(ckpt)
    backbone = _backbone_from(checkpoint, ckpt, quantization="none", reference="none", gradient_checkpointing=False)
    # Written beside --out and renamed when whole: a kill leaves a hidden temporary directory whose record says
    # "incomplete" (refused when used), never an --out that looks complete without its value head or FLOPs.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    from lit_sftrl.core.disk import space_checked

    try:
        with space_checked(out.parent, f"exporting to {str(out)!r}",
                           "free some space and export again (nothing was written to it)"):
            _write_record(staging, {"complete": False})
            save_backbone(backbone, staging, merge_lora=merge_lora)
            from lit_sftrl.models.model_card import model_card

            (staging / "README.md").write_text(model_card(ckpt, checkpoint, _checkpoint_flops(checkpoint), merge_lora))
            # Compute already spent travels with the weights: a run initialised from this directory starts from it.
            _write_record(staging, {"complete": True, "source_checkpoint": str(Path(ckpt).resolve()),
                                    "flops": _checkpoint_flops(checkpoint)})
            if out.exists():
                out.rmdir()  # empty, checked above
            os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _write_record(folder: Path, record: dict[str, Any]) -> None:
    with open(folder / EXPORT_RECORD, "w") as file:
        file.write(json.dumps(record, indent=1) + "\n")
        file.flush()
        os.fsync(file.fileno())


def _checkpoint_flops(checkpoint: dict[str, Any]) -> float:
    state = checkpoint.get("flops")
    if not state:
        return 0.0
    from lit_sftrl.core.compute import FlopsCounter

    return float(FlopsCounter(**state).total)


def inherited_flops(path: str | Path) -> float:
    """Cumulative FLOPs of the run that produced ``path`` (its Lightning checkpoint's ``flops`` counter, or the
    record an export wrote beside the weights); 0.0 for a plain model directory (a base model)."""
    path = Path(path)
    if is_gguf(path):
        return 0.0  # a base model
    if path.is_dir() and not is_distributed_checkpoint(path):
        record = path / EXPORT_RECORD
        return float(json.loads(record.read_text()).get("flops") or 0.0) if record.exists() else 0.0
    return _checkpoint_flops(read_lightning_checkpoint(path))


def load_weights_for_init(backbone: Backbone, path: str | Path) -> None:
    """Initialise ``backbone`` from an earlier run, value head excepted (PPO's ``init_from`` an SFT run).

    ``path``: a Lightning checkpoint of that run, or a directory it was exported to (merged: the base weights
    are replaced; adapter-only: the LoRA weights are loaded). Weights move between LoRA and full fine-tuning by
    their plain Hugging Face names; quantised targets can take LoRA weights only.
    """
    path = Path(path)
    if path.is_dir() and not is_distributed_checkpoint(path):
        check_model_directory(path)
        if (path / "adapter_config.json").exists():
            _load_adapter_dir(backbone, path)
            return
        # Through transformers: checkpoints on disk may use legacy key names that only its loader maps.
        # Prefixed as the wrapper names them (its transformers model is the attribute `model`).
        state = {f"model.{k}": v for k, v in load_plain_model(path).state_dict().items()}
    else:
        check_lightning_checkpoint(path)
        checkpoint = read_lightning_checkpoint(path)
        source = _backbone_config(checkpoint)
        if Path(source.path).resolve() != Path(backbone.config.path).resolve():
            log.warning("%s was trained on %s, this backbone loads %s", path, source.path, backbone.config.path)
        state = _backbone_state(checkpoint)
        if source.lora is not None and backbone.config.lora is None:
            # A LoRA run into full fine-tuning: its adapter merged into the base weights this backbone loaded.
            state = merge_lora_state(state, source.lora.alpha, source.lora.r, backbone)
    try:
        copy_by_canonical_name(backbone, state, skip_value_head=True)
    except ValueError as error:
        raise ValueError(
            f"cannot initialise from {str(path)!r}: {error}. To start from a full model under quantisation, "
            "export it and set backbone.path to the exported directory."
        ) from None


def _load_adapter_dir(backbone: Backbone, path: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if backbone.config.lora is None:
        raise ValueError(f"{str(path)!r} is a LoRA adapter but this backbone has no `lora` settings")
    result = set_peft_model_state_dict(backbone.model, load_file(str(path / "adapter_model.safetensors")))
    if result.unexpected_keys:
        raise ValueError(f"adapter {str(path)!r} does not fit this backbone: {result.unexpected_keys[:3]}")


def save_backbone(backbone: Backbone, out: str | Path, merge_lora: bool = True) -> Path:
    """A standard Hugging Face directory (model + processor) that plain transformers loads; the value head
    beside it in ``value_head.safetensors``. Under LoRA with ``merge_lora=False``: the peft adapter only
    (``adapter_config.json`` pointing at the absolute base path)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = backbone.config
    if config.lora is None:
        backbone.model.save_pretrained(out)
    elif merge_lora:
        if config.quantization != "none":
            raise ValueError(
                "cannot merge LoRA into quantised weights; use export_checkpoint (reloads the base unquantised)"
            )
        backbone.base_model.save_pretrained(out, state_dict=merged_state_dict(backbone.model))
    else:
        active = backbone.model.active_adapter
        backbone.model.peft_config[active].base_model_name_or_path = str(backbone.path.resolve())
        backbone.model.save_pretrained(out, selected_adapters=[active])  # never a KL anchor's frozen adapter
    save_processor(backbone.processor, out)  # image-only processors under a class plain transformers has
    if backbone.value_head is not None:
        backbone.value_head.save(out)
    return out
