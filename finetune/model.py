"""Load the model and tokenizer a recipe names (hub id, local folder or GGUF file), with dtype, LoRA, checkpointing."""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import peft
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import attention
from .model_files import ModelError, resolve_model_path, write_aside
from .recipe import LoraSection, ModelSection, QuantizationSection


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
    if section.quantization is not None:
        _one_4bit_kernel(model)
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


def _one_4bit_kernel(model) -> None:
    """Keeps bitsandbytes' 4-bit layers on the kernel they train with. On a CPU with AVX512-BF16, bitsandbytes
    (0.50) repacks a layer's weights for a faster kernel at its first eval-mode forward pass without gradients (an
    evaluation or probe during training), and unpacks them when the model is saved; measured on the tests' tiny model,
    the adapter reloaded from disk then scored logits 0.006-0.015 away from the model in memory. One kernel throughout
    keeps what is evaluated during training and what `finetune eval` reloads the same model."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


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
    write_aside(out_dir, write)
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


@contextmanager
def adapter_merged(model: torch.nn.Module) -> Iterator[bool]:
    """For the duration, a LoRA model's adapters folded into its base weights (yields whether they were), then every
    weight back to the bit. Evaluation then runs one matmul per adapted layer instead of three and peft's per-layer
    bookkeeping: the demo's tuned evaluation ran 1.15x faster on 2 CPU cores under bf16 autocast
    (bench/tuned_eval_ab.py --toggle merge), the scores the same but for rounding (4 and 6 of 420 multiple-choice
    items moved).
    peft's merge writes the merged weights into new tensors (safe_merge); the originals are kept aside and put back
    after peft's unmerge, because W + BA - BA is not W in float. That holds every adapted weight twice, so only on the
    CPU, and only where each adapted layer is a plain LoRA linear layer over a whole float weight: not a 4-bit base,
    nor a weight sharded by FSDP (a DTensor) or by ZeRO-3."""
    from peft.tuners.lora import Linear

    layers = list(dict.fromkeys(m for m, _ in lora_layers(model)))  # a layer with two adapters: once
    weights = [m.get_base_layer() for m in layers]
    mergeable = bool(layers) and all(
        isinstance(m, Linear) and not m.merged and type(w.weight.data) is torch.Tensor and w.weight.is_floating_point()
        and w.weight.device.type == "cpu" and not hasattr(w.weight, "ds_id") for m, w in zip(layers, weights))
    if not mergeable:
        yield False
        return
    kept = [(w.weight.data, None if getattr(w, "bias", None) is None else w.bias.data) for w in weights]

    def put_back():
        for m, w, (weight, bias) in zip(layers, weights, kept):
            if m.merged:  # peft unmerges a layer itself where it runs with its adapter disabled
                m.unmerge()
            w.weight.data = weight
            if bias is not None:
                w.bias.data = bias

    try:
        with torch.no_grad():
            for m in layers:
                m.merge(safe_merge=True)  # every active adapter of the layer
    except ValueError:  # peft refuses to merge weights that are not finite: such a model is measured as it is
        put_back()
        yield False
        return
    try:
        yield True
    finally:
        put_back()


def output_layer(model) -> torch.nn.Module:
    """The layer that turns a model's last hidden states into logits (lm_head)."""
    return getattr(model, "peft_model", model).get_output_embeddings()  # drift.AdapterDisabled: its peft model's


@contextmanager
def head_at(model, positions: torch.Tensor) -> Iterator[list]:
    """For the duration, `model`'s output layer computes logits only at `positions` (indices into the batch's
    rows x width positions): a forward pre-hook hands it those rows of its input, [1, positions, hidden]. The
    list it yields receives what the layer was given."""
    seen: list = []

    def keep_measured(module, args):
        hidden = args[0]
        rows = hidden.reshape(-1, hidden.shape[-1])[positions][None]
        seen.append(rows)
        return (rows, *args[1:])

    handle = output_layer(model).register_forward_pre_hook(keep_measured)
    try:
        yield seen
    finally:
        handle.remove()
