"""Load the model and tokenizer a recipe names (hub id, local folder or GGUF file), with dtype, LoRA, checkpointing."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import peft
import torch
import yaml
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from . import attention
from .errors import UserError
from .recipe import LoraSection, ModelSection, QuantizationSection


class ModelError(UserError):
    """A model that cannot be loaded as the recipe says."""


def resolve_model_path(section: ModelSection) -> str:
    """What to pass to `from_pretrained`: a hub id as given, a folder made absolute, a GGUF file's converted folder."""
    path = Path(section.path).expanduser()
    if path.is_dir():
        # Absolute, so a saved adapter names a base that loads from any working directory.
        return str(path.absolute())
    if path.suffix != ".gguf":
        return section.path
    path, target = path.resolve(), converted_gguf(section)
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Every process of a distributed launch gets here; one converts, the others wait and find it done.
        with FileLock(f"{target}.lock"):
            if not target.is_dir():
                _convert_gguf(path, target)
    return str(target)


def converted_gguf(section: ModelSection) -> Path:
    """Where the GGUF file `model.path` is (or will be) converted to safetensors."""
    path = Path(section.path).expanduser().resolve()
    stat = path.stat()
    # A file edited or replaced in place gets a new key, so a stale conversion is never reused.
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return Path(section.cache_dir).expanduser() / "gguf" / f"{path.stem}-{key}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    print(f"Converting {gguf.name} to safetensors once (~15 s for a 135M model on 2 CPU cores, longer for larger "
          f"ones); later runs reuse {target}", file=sys.stderr)
    # Dequantized, the model is a plain one: transformers drops its quantization marker, so it can be saved
    # (a quantized GGUF model refuses save_pretrained) and the saved config reloads without the GGUF file.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    _write_aside(target, write)


def _write_aside(final: Path, write: Callable[[Path], None]) -> None:
    """Write a folder beside `final` and rename it into place, so a crash never leaves one that looks complete."""
    partial = final.with_name(f".{final.name}.partial-{os.getpid()}")
    try:
        write(partial)
        os.replace(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def load_tokenizer(section: ModelSection, chat_template: str | None = None):
    """The model's tokenizer, ready for batching: a pad token, right padding, the recipe's chat template if any."""
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(section), revision=section.revision, trust_remote_code=section.trust_remote_code
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(
                f"the tokenizer of {section.path} has neither a pad token nor an eos token; add one to its "
                "tokenizer_config.json (e.g. \"pad_token\": \"<pad>\") or pick another model."
            )
        # Safe because padded positions are masked out of attention and of the labels (by the attention mask,
        # not by comparing ids), so the real eos tokens still count as targets.
        tokenizer.pad_token = tokenizer.eos_token
    # Right padding keeps each row's tokens at positions 0..n-1, as in packed rows and at inference.
    tokenizer.padding_side = "right"
    return tokenizer


def _quantization_config(q: QuantizationSection):
    """transformers' bitsandbytes settings for `model.quantization`; refuses what finetune cannot train."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("`model.quantization` needs bitsandbytes: pip install -e \".[qlora]\" (or pip install "
                         "bitsandbytes), or set `model.quantization: null`.")
    from .engine import asked_for

    if sharded := asked_for():
        raise ModelError(f"`model.quantization` (QLoRA) runs on one device or under DDP, not under {sharded[0]}: the "
                         "4-bit weights are not sharded here. Launch with launch/single_device.yaml or "
                         "launch/multi_gpu_ddp.yaml (each GPU holds the whole 4-bit model; `finetune plan` says "
                         "whether it fits), or set `model.quantization: null`.")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.type, bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype))


def load_model(section: ModelSection, lora: LoraSection | None):
    """The model to train: LoRA-wrapped (only the adapter trainable) when `lora` is given, else all weights. With
    `model.quantization` the base weights load in 4 bits (transformers puts them on the current device)."""
    if section.trust_remote_code:
        warnings.warn(f"model.trust_remote_code is on: Python code shipped with {section.path} will run on this "
                      "machine. Only do this for models you trust.", stacklevel=2)
    # Loading the resolved path makes config.name_or_path (and so the base a saved adapter names) the folder
    # that holds the weights: for a GGUF file, the converted folder, which from_pretrained can load again.
    path = resolve_model_path(section)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=getattr(torch, section.dtype),
            revision=section.revision,
            trust_remote_code=section.trust_remote_code,
            attn_implementation=section.attn_implementation,
            # None lets transformers fall back to .bin files, which are pickles: loading one can run code.
            use_safetensors=None if section.allow_pickle else True,
            quantization_config=_quantization_config(section.quantization) if section.quantization else None,
        )
    except OSError as e:
        if section.allow_pickle or not list(Path(path).glob("*.bin")):
            raise
        raise ModelError(f"{section.path} has only pickle-based .bin weights, which can run arbitrary code when "
                         "loaded, so they are refused. Convert them to safetensors, or set "
                         "`model.allow_pickle: true` if you trust the files.") from e
    # The KV cache only speeds up generation; in training it costs memory and clashes with checkpointing.
    model.config.use_cache = False
    if section.attn_implementation == "sdpa" and model._can_set_attn_implementation():
        # sdpa itself, plus one causal call per example for packed batches that say where examples end.
        model.set_attn_implementation(attention.register())
    if section.quantization is not None and lora is not None:
        # Freezes the base and casts what stays unquantized (embeddings, norms, head) to float32, for stable
        # training; checkpointing is turned on below, by our own switch (non-reentrant).
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if section.gradient_checkpointing:
        # Non-reentrant: gradients reach the LoRA weights inside a recomputed block even when the block's
        # input needs no gradient, which the reentrant variant silently drops.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        config = peft.LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=_targets(model, lora),
            use_dora=lora.use_dora,
            use_rslora=lora.use_rslora,
            layers_to_transform=_adapted_layers(model, lora.first_layer),
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():
            # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`: a warning we cannot act on.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            model = peft.get_peft_model(model, config)
    return model


def _targets(model, lora: LoraSection) -> str | list[str]:
    """peft's target_modules. peft expands the string "all-linear" itself (every linear layer but the output head),
    but refuses it beside `layers_to_transform`: then the same linears are named here."""
    if lora.target_modules != ["all-linear"]:
        return lora.target_modules
    if not lora.first_layer:
        return "all-linear"
    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head})


def _adapted_layers(model, first: int) -> list[int] | None:
    """The decoder layers LoRA adapts: all of them (None, peft's default) or those from `first` up."""
    if first == 0:
        return None
    n = model.config.num_hidden_layers
    if first >= n:
        raise ModelError(f"`lora.first_layer: {first}` leaves no layer to adapt: the model has {n} decoder layers "
                         f"(0 to {n - 1}); set it below {n}, or 0 to adapt every layer.")
    return list(range(first, n))


def lora_layers(model) -> list[tuple[torch.nn.Module, str]]:
    """(layer, adapter name) for every LoRA layer and each of its adapters; [] for a model without LoRA."""
    from peft.tuners.lora import LoraLayer

    return [(m, name) for m in model.modules() if isinstance(m, LoraLayer) for name in m.lora_A]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights count once, a 4-bit weight as the weights it packs. Under
    DeepSpeed ZeRO-3 a rank holds an empty placeholder for each parameter, and the parameter's size in `ds_numel`."""
    params = list(model.parameters())
    # bitsandbytes packs two 4-bit weights per byte; quant_state keeps the original shape.
    sizes = [p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None
             else getattr(p, "ds_numel", p.numel()) for p in params]
    return sum(n for p, n in zip(params, sizes) if p.requires_grad), sum(sizes)


def quantized_base(adapter_dir: str | Path) -> dict | None:
    """The `model.quantization` a run's adapter was trained with (from the resolved recipe.yaml of the run that
    holds it, read as data: its dataset paths may not resolve from here), or None."""
    folder = Path(adapter_dir)
    saved = folder / "recipe.yaml" if (folder / "recipe.yaml").is_file() else folder.parent / "recipe.yaml"
    recipe = yaml.safe_load(saved.read_text(encoding="utf-8")) if saved.is_file() else None
    model = recipe.get("model") if isinstance(recipe, dict) else None
    return model.get("quantization") if isinstance(model, dict) else None


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Fold a LoRA adapter into its base model and save a standalone model (safetensors) with its tokenizer."""
    from .checkpoint import local_base, merge_source

    out_dir = Path(out_dir)
    adapter_dir = merge_source(Path(adapter_dir), out_dir)
    config = peft.PeftConfig.from_pretrained(adapter_dir)
    # float32: added to bfloat16 weights, much of the adapter's small update would round away. Never quantized, also
    # for a QLoRA adapter: folded into 4-bit weights the update would be lost to their rounding. The base's local copy
    # (kept in finetune.json) comes first: the hub name in adapter_config.json may not be reachable from here.
    base = AutoModelForCausalLM.from_pretrained(
        local_base(adapter_dir) or config.base_model_name_or_path, revision=config.revision, dtype=torch.float32,
        use_safetensors=True
    )
    merged = peft.PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(
        adapter_dir if has_tokenizer else local_base(adapter_dir) or config.base_model_name_or_path,
        revision=config.revision
    )

    def write(folder: Path) -> None:
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _write_aside(out_dir, write)
    return out_dir


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Dropout off for the duration (identical weights must give identical logits), then each module's own mode back:
    `model.train(was_training)` would set them all alike, and a model is not always in one mode (from_pretrained
    leaves the base's modules in eval mode, peft adds its layers in training mode)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
