"""Loading a local Hugging Face model with the backbone's options: dtype, bitsandbytes quantisation, LoRA,
activation checkpointing, frozen vision tower. Nothing here downloads anything.

A ``.gguf`` file stands for the Hugging Face directory transformers' GGUF support makes of it (dequantised), built
once into a cache (:func:`dequantised_gguf`): reading a GGUF file costs tens of seconds per load, and a model
loaded from one refuses ``save_pretrained``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from lit_sftrl.models.config import BackboneConfig, LoraSettings

log = logging.getLogger(__name__)

# Module-name fragments of vision towers and projectors across families (Mllama, LLaVA, Qwen2-VL, Idefics3,
# Gemma3...). Used to keep LoRA and quantisation off the vision side and to freeze it.
VISION_MODULES = ("vision_model", "vision_tower", "visual", "multi_modal_projector")
_LM_LINEARS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
# Decoder-layer linears of the language model only: plain names would also match the vision towers' q_proj etc.
# The negative look-ahead keeps this valid for text-only causal LMs (no "language_model" in their names).
DEFAULT_LORA_TARGETS = rf"^(?!.*(vision|visual|multi_modal_projector)).*\.layers\.\d+\.(.*\.)?({_LM_LINEARS})$"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def is_vision_module(name: str) -> bool:
    return any(part in VISION_MODULES for part in name.split("."))


def auto_model_class(path: str | Path):
    """AutoModelForImageTextToText for VLMs, AutoModelForCausalLM for text-only LMs (L tasks)."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
    )
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    model_type = AutoConfig.from_pretrained(path, trust_remote_code=False).model_type
    return (
        AutoModelForImageTextToText
        if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        else AutoModelForCausalLM
    )


def load_processor(path: str | Path):
    """The processor of a VLM (image-only where its video side needs torchvision, see ``processors``); the
    tokenizer alone for a text-only LM (whose directory may still name a processor class it was derived from)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_sftrl.models.processors import load_vlm_processor

    if auto_model_class(path) is AutoModelForCausalLM:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return load_vlm_processor(path)


GGUF_CACHE_ENV = "LIT_SFTRL_GGUF_CACHE"


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def resolve_backbone_path(path: str | Path) -> Path:
    """The model directory ``backbone.path`` stands for: itself, the dequantised directory of a ``.gguf`` file, or
    a tiny model built on first use (``tiny-<family>[-small]``)."""
    from lit_sftrl.models.tiny import resolve_model_path

    return dequantised_gguf(path) if is_gguf(path) else resolve_model_path(path)


def gguf_cache_dir(file: str | Path) -> Path:
    """Where the dequantised directory of ``file`` lives: under ``$LIT_SFTRL_GGUF_CACHE`` (default
    ``checkpoints/gguf``), keyed by the file's absolute path, size and modification time."""
    file = Path(file)
    stat = file.stat()
    key = hashlib.sha256(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return Path(os.environ.get(GGUF_CACHE_ENV, "checkpoints/gguf")) / f"{file.stem}-{key}"


def check_gguf_file(path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{str(path)!r} is not a GGUF file (its first bytes are not 'GGUF')")


def dequantised_gguf(path: str | Path) -> Path:
    """A standard Hugging Face directory (float32 weights, tokenizer with its chat template) of the GGUF file at
    ``path``, converted through transformers' GGUF support on first use and reused after (see
    :func:`gguf_cache_dir`). Written to a temporary sibling and renamed, so a crash leaves no half directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = Path(path)
    check_gguf_file(file)
    out = gguf_cache_dir(file)
    if (out / "config.json").is_file():
        return out
    # Causal LMs only: transformers reads no vision tower from GGUF. Each read parses the whole file (~10-40 s).
    kwargs = {"gguf_file": file.name, "trust_remote_code": False}
    tokenizer = AutoTokenizer.from_pretrained(file.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(file.parent, dtype=torch.float32, **kwargs)
    # The weights are dequantised floats already; only the GGUF marker makes save_pretrained refuse them.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the directory is a shared cache
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "lit_sftrl_gguf.json").write_text(json.dumps({"source": str(file.resolve())}, indent=1) + "\n")
        os.rename(tmp, out)
    except OSError:
        if not (out / "config.json").is_file():  # a real failure, not a concurrent converter that won the rename
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s: dequantised into %s", file, out)
    return out


@lru_cache(maxsize=8)
def logical_num_parameters(path: str) -> int:
    """Parameter count of the architecture at ``path`` (instantiated on the meta device: no memory, and quantised
    weights count as their logical size, not their packed storage)."""
    from transformers import AutoConfig

    with torch.device("meta"):
        model = auto_model_class(path).from_config(AutoConfig.from_pretrained(path, trust_remote_code=False))
    return sum(p.numel() for p in model.parameters())


class _OnceFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        first = message not in self.seen
        self.seen.add(message)
        return first


def _log_once(logger_name: str) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _OnceFilter) for f in logger.filters):
        logger.addFilter(_OnceFilter())


def _quantization_config(config: BackboneConfig):
    from transformers import BitsAndBytesConfig

    # Keep the vision side and the output layer in float: int8 on Mllama's vision tower breaks (docs/stack.md), and
    # they are a small share of the weights. transformers matches a skip name from the start of a module's full
    # name or as its suffix, so a plain "vision_model" missed "model.vision_model.<...>.q_proj": each name is a
    # pattern under any parent.
    skip = [rf"(?:.*\.)?{name}" for name in (*VISION_MODULES, "lm_head")]
    if config.quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=DTYPES[config.dtype],
            llm_int8_skip_modules=skip,
        )
    _log_once("bitsandbytes.autograd._functions")  # it logs the fp32 -> fp16 cast on every int8 matmul
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def disable_bnb_cpu_repacking(model: nn.Module) -> None:
    """On AVX512-BF16 CPUs a 4-bit layer's first inference forward repacks its weight for good, after which any
    backward fails; PPO generates before it trains, so always switch the repacking off (docs/stack.md)."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # no quantised layers possible
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_base_model(config: BackboneConfig, path: Path) -> nn.Module:
    """The pretrained model with dtype and quantisation applied, frozen where the options say so."""
    if config.quantization != "none" and config.lora is None:
        raise ValueError(
            f"quantization={config.quantization!r} needs `lora` (QLoRA): quantised weights cannot be trained"
        )
    kwargs = {"dtype": DTYPES[config.dtype]}
    if config.quantization != "none":
        kwargs["quantization_config"] = _quantization_config(config)
    model = auto_model_class(path).from_pretrained(path, trust_remote_code=False, **kwargs)
    if config.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if config.freeze_vision:
        for name, param in model.named_parameters():
            if is_vision_module(name):
                param.requires_grad_(False)
    if config.gradient_checkpointing:
        # Non-reentrant: works with frozen embeddings (LoRA) without enable_input_require_grads. transformers 5
        # renamed the method (the old name warns); keep the old one for earlier releases.
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@contextmanager
def checkpointing_in_eval_mode(model: nn.Module) -> Iterator[None]:
    """Activation checkpointing for a model in eval mode. transformers checkpoints a layer only while that layer is
    ``training``, but PPO scores its answers in eval mode (no dropout: the first epoch's ratio must start at
    exactly 1), so ``gradient_checkpointing`` silently kept every activation there. The checkpointed layers alone
    are flagged as training meanwhile; their submodules (attention, dropout) stay in eval mode."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True and not m.training]
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap ``model`` in a peft LoRA model; only the adapter weights (and the copies of ``modules_to_save``, checked
    first) stay trainable."""
    from peft import LoraConfig, get_peft_model

    targets = settings.target_modules if settings.target_modules is not None else DEFAULT_LORA_TARGETS
    saved = list(settings.modules_to_save) if settings.modules_to_save else None  # peft extends the list it gets
    if saved is not None:
        check_modules_to_save(model, saved, targets)
    lora = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        modules_to_save=saved,
        **_weight_tying(model, saved),
    )
    with warnings.catch_warnings():
        # peft calls a transformers property deprecated in v5 (is_gradient_checkpointing): noise, not ours to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


def is_lora_target(name: str, targets: str | list[str]) -> bool:
    """peft's rule for ``target_modules``: a string is a regex over the full module name, a list names suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith(f".{target}") for target in targets)


def saved_module_names(model: nn.Module, saved: list[str]) -> list[str]:
    """The full names of the modules ``modules_to_save`` names (peft's rule: the name itself, or a suffix after a
    dot), outermost only."""
    matches = [name for name, _ in model.named_modules() if any(_is_named(name, wanted) for wanted in saved)]
    return [name for name in matches if not any(name.startswith(f"{outer}.") for outer in matches)]


def check_modules_to_save(model: nn.Module, saved: list[str], targets: str | list[str]) -> None:
    """Refuse, in one line, a ``modules_to_save`` name that no module has (peft would skip it silently and train
    less than asked), or one that names a quantised module or one LoRA adapts (its copy could not train, or would
    carry the adapter inside)."""
    names = dict(model.named_modules())
    adapted = [name for name in names if is_lora_target(name, targets)]
    for wanted in saved:
        matches = [name for name in names if _is_named(name, wanted)]
        if not matches:
            raise ValueError(
                f"backbone.lora.modules_to_save: this model has no module named {wanted!r} (or ending in "
                f"'.{wanted}'); its input and output embeddings are {_embedding_names(model)}"
            )
        for name in matches:
            if any(inner == name or inner.startswith(f"{name}.") for inner in adapted):
                raise ValueError(
                    f"backbone.lora.modules_to_save: {name!r} is (or holds) a layer LoRA adapts "
                    "(backbone.lora.target_modules): train it through the adapter or in full, not both"
                )
            if any(not param.dtype.is_floating_point for param in names[name].parameters()):
                raise ValueError(f"backbone.lora.modules_to_save: {name!r} is quantised: a copy of it cannot train")


def _is_named(name: str, wanted: str) -> bool:
    return name == wanted or name.endswith(f".{wanted}")


def ties_embeddings(model: nn.Module) -> bool:
    """Whether the input and output embeddings are one matrix."""
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def _weight_tying(model: nn.Module, saved: list[str] | None) -> dict[str, bool]:
    """peft's option that keeps the trained copy of tied input and output embeddings (SmolLM2, Gemma3) one matrix:
    without it peft trains two separate copies, and a merged export, which stores the pair once, keeps one of them.
    Given only when tied: some peft releases tie the copies of an untied model's embeddings too
    (huggingface/peft#2944)."""
    from peft import LoraConfig
    from peft import __version__ as peft_version

    if not saved or not _saves_tied_embeddings(model, saved):
        return {}
    if "ensure_weight_tying" not in {field.name for field in dataclasses.fields(LoraConfig)}:
        raise ValueError(
            "backbone.lora.modules_to_save: this model ties its input and output embeddings, and keeping their "
            f"trained copy tied needs peft >= 0.18 (ensure_weight_tying); installed: {peft_version}"
        )
    return {"ensure_weight_tying": True}


def _saves_tied_embeddings(model: nn.Module, saved: list[str]) -> bool:
    if not ties_embeddings(model):
        return False
    embeddings = {model.get_input_embeddings(), model.get_output_embeddings()}
    return any(model.get_submodule(name) in embeddings for name in saved_module_names(model, saved))


def _embedding_names(model: nn.Module) -> str:
    embeddings = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    found = [repr(name) for name, module in model.named_modules() if id(module) in embeddings]
    return " and ".join(found) if found else "unknown"


def load_plain_model(path: str | Path, dtype: str = "float32") -> nn.Module:
    """A frozen, eval-mode model from ``path``, no options applied (the full fine-tuning reference policy; a source
    of weights under their in-memory names, which transformers may store differently on disk)."""
    model = auto_model_class(path).from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=False)
    model.requires_grad_(False)
    return model.eval()


def check_model_directory(path: str | Path) -> None:
    """Raise ValueError naming the file unless ``path`` reads back as a whole Hugging Face model (or LoRA adapter)
    directory, or a GGUF file (its magic bytes only): a config, every JSON file parsing, and every safetensors file
    as long as its header says (a copy cut short, a half-written export). Reads headers only, so it is cheap at any
    model size; flipped bytes inside tensors are not caught (safetensors carries no checksum)."""
    path = Path(path)
    if is_gguf(path):
        check_gguf_file(path)
        return
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise ValueError(f"{str(path)!r} is not a Hugging Face model directory: it has no config.json")
    _refuse_remote_code(path)
    _refuse_incomplete_export(path)
    for file in sorted(path.glob("*.json")):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"{str(file)!r} is truncated or corrupted (not JSON: {error})") from None
    index = path / "model.safetensors.index.json"
    shards = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else set()
    missing = sorted(shard for shard in shards if not (path / shard).is_file())
    if missing:
        raise ValueError(f"{str(index)!r} lists weight files that are missing: {missing[:3]}")
    weights = sorted(path.glob("*.safetensors"))
    if not weights and not any(path.glob("*.bin")):
        raise ValueError(f"{str(path)!r} has no weights (*.safetensors or *.bin)")
    for file in weights:
        _check_safetensors(file)


def _refuse_incomplete_export(path: Path) -> None:
    """``lit-sftrl export`` writes its record first ("complete": false) and last ("complete": true), in a temporary
    directory renamed into place: a directory whose record is not complete was cut short (weights, value head or
    FLOPs missing) and would otherwise load as if whole."""
    record = path / "lit_sftrl_export.json"
    try:
        complete = json.loads(record.read_text(encoding="utf-8")).get("complete", True)
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return  # no record (not an export), or reported as corrupted by the JSON check
    if complete is not True:
        raise ValueError(
            f"{str(path)!r} is an incomplete export (its {record.name} says so): export the checkpoint again"
        )


def _refuse_remote_code(path: Path) -> None:
    """A directory whose config maps its classes to its own Python (``auto_map``) needs trust_remote_code, which
    lit-sftrl never gives (transformers would otherwise ask y/N on the console, or import that code)."""
    for name in ("config.json", "processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        try:
            config = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            continue  # missing, or reported as corrupted by the checks below
        if isinstance(config, dict) and config.get("auto_map"):
            raise ValueError(
                f"{str(path / name)!r} maps its classes to the directory's own Python code (auto_map): refused, "
                "lit-sftrl loads models with trust_remote_code=False"
            )


def _check_safetensors(file: Path) -> None:
    """8 bytes of header length, the JSON header, then exactly the tensor bytes the header describes."""
    size = file.stat().st_size
    try:
        with file.open("rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_length > size - 8:
                raise ValueError("shorter than its header")
            header = json.loads(handle.read(header_length))
        end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as error:
        raise ValueError(f"weights {str(file)!r} are truncated or corrupted ({error})") from None
    if 8 + header_length + end != size:
        raise ValueError(
            f"weights {str(file)!r} are truncated or corrupted: its header describes {8 + header_length + end} "
            f"bytes, the file has {size}"
        )
