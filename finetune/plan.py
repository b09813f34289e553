"""`finetune plan`: memory per device and bytes sent per update for a recipe under a launch config, and whether it
fits, from the model's config alone: the model is built on the meta device (no weights are read or allocated).

What it counts, per device, in bytes of tensors (what `torch.cuda.max_memory_allocated` reports on a GPU) at the
busiest moment of a step (the end of the forward, the start or the end of the backward):
- weights: as loaded (`model.dtype`; 4-bit QLoRA weights with their block scales, and the rest in float32 as peft's
  k-bit preparation leaves it; a LoRA adapter in float32); sharded under FSDP and ZeRO-3.
- gradients and AdamW's two states, in the trainable weights' dtype (DeepSpeed: bf16 weights, float32 master copy
  and states, sharded); DDP's gradient buckets (a second copy of the gradients) are an engine buffer.
- activations kept for the backward, per decoder layer, as the layers in transformers compute them (pre-norm
  decoder: the norms' inputs and outputs, each matmul's input, q/k/v after rotary, attention output, the MLP's
  intermediate tensors, LoRA's rank-r outputs); with gradient checkpointing, each layer's input plus one layer
  recomputed. Autocast keeps a bf16 copy of each matmul's input and weight where the weights are float32.
- the loss: finetune's head runs on target tokens only and its cross-entropy keeps one float32 gradient the size of
  the logits; every token is counted as a target (an upper bound: prompts are not targets).
- engine buffers: DDP buckets, FSDP's two gathered layers (and its unsharded gradients while accumulating), ZeRO's
  buckets and gathered parameters at DeepSpeed's default bucket sizes (accelerate's configs leave them at default).
What it leaves out: the CUDA context and libraries (outside the allocator) and the allocator's fragmentation: the
verdict keeps 5% and 1 GiB of the device for them (assumed, not measured here). The estimate was checked on CPU
against measured peaks (README, "Will it fit?"; tests/test_plan.py); the GPU-only parts (autocast on GPUs, FSDP,
DeepSpeed, 4-bit on GPUs) are not measured yet.

Bytes sent per device per optimizer update (ring collectives: (N-1)/N of the collective's size for an all-gather or a
reduce-scatter, twice that for an all-reduce): DDP all-reduces the gradients once per update (accumulation steps
run without sync); FSDP (full shard) all-gathers the weights in the forward and again in the backward of every
micro-step and reduce-scatters the gradients once per update; ZeRO-2 reduce-scatters gradients every micro-step and
all-gathers the updated weights once; ZeRO-3 gathers the weights twice and reduces the gradients every micro-step.

A little over our ~450-line rule: the layout read from the config, the estimate and its table are one command whose
parts only this module uses; the estimate is split by what it counts (state at rest, the busiest phase, traffic).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import UserError
from .recipe import ModelSection, Recipe

GiB = 2**30
CONFIGS = Path(__file__).with_name("model_configs")  # config.json of real models, named org--name.json
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ENGINES = ("DDP", "FSDP", "ZeRO-2", "ZeRO-3")
CONTEXT_GIB = 1.0  # CUDA context, cuBLAS and NCCL workspaces: outside the allocator (assumed)
ALLOCATOR_SHARE = 0.05  # what the caching allocator holds beyond live tensors (assumed)
# DeepSpeed's defaults, which accelerate's launch configs leave in place: bucket sizes and the cap on gathered
# ZeRO-3 parameters, in elements.
DS_BUCKET = 5e8
DS_MAX_LIVE = 1e9


class PlanError(UserError):
    """A model config or launch config the plan cannot read; the message says which and what to do."""


@dataclass(frozen=True)
class Linear:
    name: str  # inside a decoder layer, e.g. self_attn.q_proj
    group: str  # attn_in, attn_out, mlp_in, mlp_out: linears of one input group read the same tensor
    inp: int
    out: int


@dataclass
class Layout:
    """What the plan needs of a model, from its config."""
    source: str
    arch: str
    layers: int
    hidden: int
    heads: int
    q_width: int
    kv_width: int
    vocab: int
    params: int  # tied weights once
    layer_params: int
    linears: list[Linear]  # one decoder layer's

    @property
    def intermediate(self) -> int:
        return next(l.inp for l in self.linears if l.group == "mlp_out")

    @property
    def gated(self) -> bool:
        return sum(l.out for l in self.linears if l.group == "mlp_in") == 2 * self.intermediate

    @property
    def linear_params(self) -> int:
        """The decoder layers' matmul weights: what 4-bit quantization packs (the head stays as it is)."""
        return self.layers * sum(l.inp * l.out for l in self.linears)


@dataclass
class Launch:
    engine: str  # one device, DDP, FSDP, ZeRO-2, ZeRO-3
    processes: int
    mixed_precision: str | None
    source: str
    reshard_after_forward: bool = True
    offload_optimizer: bool = False
    offload_params: bool = False
    activation_checkpointing: bool = False


# ---------------------------------------------------------------- reading the model and the launch config


def _config(section: ModelSection):
    from transformers import AutoConfig

    path = Path(section.path).expanduser()
    shipped = CONFIGS / (section.path.replace("/", "--") + ".json")
    try:
        if path.suffix == ".gguf":
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name), "GGUF metadata"
        if path.is_dir():
            return AutoConfig.from_pretrained(path, trust_remote_code=section.trust_remote_code), str(path)
        if shipped.is_file():
            return AutoConfig.from_pretrained(shipped), "config shipped with finetune"
        return (AutoConfig.from_pretrained(section.path, revision=section.revision,
                                           trust_remote_code=section.trust_remote_code), "hub config")
    except (OSError, ValueError) as e:
        shipped_ids = sorted(p.stem.replace("--", "/") for p in CONFIGS.glob("*.json"))
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"no config for `model.path` {section.path} ({reason}). finetune ships the configs of "
                        f"{', '.join(shipped_ids)}; for another model, point model.path at a folder holding its "
                        "config.json (the weights are not needed).") from None


def load_layout(section: ModelSection) -> Layout:
    """The model's shape: one decoder layer built on the meta device, scaled to the config's layer count."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config, source = _config(section)
    layers = config.num_hidden_layers
    one = copy.deepcopy(config)
    one.num_hidden_layers = 1
    if isinstance(getattr(one, "layer_types", None), list):  # per-layer attention kinds must match the count
        one.layer_types = one.layer_types[:1]
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(one, trust_remote_code=section.trust_remote_code)
    model.tie_weights()  # from_config leaves a tied head as a parameter of its own; from_pretrained ties it
    block_names = set(model._no_split_modules or ())
    block = next((m for m in model.modules() if type(m).__name__ in block_names), None)
    parts = [(name, [(n, m) for n, m in child.named_modules() if isinstance(m, torch.nn.Linear)])
             for name, child in (block.named_children() if block is not None else ())]
    parts = [(name, found) for name, found in parts if found]
    if len(parts) != 2:
        raise PlanError(f"{section.path}: `finetune plan` knows decoders whose layers hold an attention and an MLP "
                        f"block ({type(model).__name__} has another shape).")
    linears = []
    for kind, (name, found) in zip(("attn", "mlp"), parts):
        # The last linear of a block is its output projection; the others read the block's input.
        for i, (n, m) in enumerate(found):
            group = f"{kind}_out" if i == len(found) - 1 else f"{kind}_in"
            linears.append(Linear(f"{name}.{n}", group, m.in_features, m.out_features))
    layer_params = sum(p.numel() for p in block.parameters())
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Layout(source=source, arch=type(model).__name__, layers=layers, hidden=config.hidden_size, heads=heads,
                  q_width=heads * head_dim,
                  kv_width=(getattr(config, "num_key_value_heads", None) or heads) * head_dim,
                  vocab=config.vocab_size, params=sum(p.numel() for p in model.parameters()) +
                  (layers - 1) * layer_params, layer_params=layer_params, linears=linears)


def read_launch(path: Path | None, processes: int | None) -> Launch:
    if processes is not None and processes < 1:
        raise PlanError(f"--processes is the number of processes, 1 or more, not {processes}.")
    if path is None:
        n = processes or 1
        return Launch("one device" if n == 1 else "DDP", n, None, "no launch config")
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise PlanError(f"launch config {path} cannot be read: {e}") from None
    kind = str(data.get("distributed_type", "NO"))
    n = processes or int(data.get("num_processes", 1))
    launch = Launch("one device" if kind == "NO" and n == 1 else "DDP", n, data.get("mixed_precision"), str(path))
    if kind == "FSDP":
        fsdp = data.get("fsdp_config") or {}
        reshard = fsdp.get("fsdp_reshard_after_forward", True)
        launch = dataclasses.replace(launch, engine="FSDP", reshard_after_forward=reshard in (True, "FULL_SHARD"),
                                     offload_params=bool(fsdp.get("fsdp_offload_params")),
                                     activation_checkpointing=bool(fsdp.get("fsdp_activation_checkpointing")))
    elif kind == "DEEPSPEED":
        ds = data.get("deepspeed_config") or {}
        stage = ds.get("zero_stage")
        if stage not in (2, 3):
            raise PlanError(f"launch config {path}: `finetune plan` knows DeepSpeed ZeRO stages 2 and 3, not "
                            f"{stage!r}.")
        launch = dataclasses.replace(launch, engine=f"ZeRO-{stage}",
                                     offload_optimizer=ds.get("offload_optimizer_device", "none") != "none",
                                     offload_params=ds.get("offload_param_device", "none") != "none")
    return launch


# ---------------------------------------------------------------- the estimate


def _adapted(name: str, targets: list[str]) -> bool:
    """peft's matching: all-linear, or a target equal to the module name or its last parts."""
    return targets == ["all-linear"] or any(name == t or name.endswith("." + t) for t in targets)


@dataclass
class Estimate:
    parts: dict[str, float]  # bytes per device at the busiest moment; they add up to `peak`
    peak: float
    sent: float  # bytes each device sends per optimizer update
    trainable: int  # parameters
    supported: bool = True


def _layer_bytes_per_token(layout: Layout, lora, adapted: list[Linear], rb: int, ab: int, att_b: int,
                           autocast: bool, half: bool) -> float:
    """Bytes one decoder layer keeps for its backward, per token: `rb` is the residual stream's element size, `ab`
    the matmul outputs', `att_b` attention's; `half`: bf16/fp16 compute (autocast, or DeepSpeed's cast model)."""
    h, full = layout.hidden, lora is None
    norm = (4 * h if rb < 4 else 0) + (h * rb if full else 0)  # float32 upcast; normalised input (weight's gradient)
    per_layer = 2 * (h * rb + norm)
    for group, input_b in (("attn_in", rb), ("attn_out", att_b), ("mlp_in", rb), ("mlp_out", ab)):
        members = [l for l in layout.linears if l.group == group]
        savers = len(members) if full else sum(l in adapted for l in members)
        width = members[0].inp
        if savers:  # under autocast each matmul saves its own bf16 copy of a float32 input; else they share it
            per_layer += savers * width * 2 if autocast and input_b == 4 else width * input_b
    per_layer += (2 * layout.q_width + 2 * layout.kv_width) * att_b + layout.heads * 4  # q, k, v, output, logsumexp
    mlp_in = sum(l.out for l in layout.linears if l.group == "mlp_in")
    per_layer += (mlp_in + (layout.intermediate if layout.gated else 0)) * ab
    if lora:
        per_layer += len(adapted) * lora.r * (2 if half else 4)  # lora_A's outputs
        if lora.dropout:
            per_layer += sum(l.inp * (rb + 1) for l in adapted)  # dropped copy and mask per adapted linear
    return per_layer


@dataclass
class _Precision:
    """What the memory and the traffic parts share: what is trained, and in how many bytes each thing is held."""
    trainable: float  # parameters
    adapted: list  # the LoRA-adapted linears of a layer
    wb: int  # weights as loaded
    tb: int  # trained weights (peft keeps adapters in float32)
    gb: int  # gradients
    gather_b: int  # what FSDP and ZeRO-3 gather
    half: bool  # bf16/fp16 mixed precision
    zero: bool  # a DeepSpeed engine
    autocast: bool  # torch autocast (DeepSpeed casts the model itself instead)


def _precision(layout: Layout, recipe: Recipe, launch: Launch, engine: str) -> _Precision:
    lora = recipe.lora
    mixed = recipe.train.mixed_precision or launch.mixed_precision or "no"
    wb = BYTES[recipe.model.dtype]
    zero = engine.startswith("ZeRO")
    half = mixed in ("bf16", "fp16")
    adapted = [l for l in layout.linears if lora and _adapted(l.name, lora.target_modules)]
    # Activations are still counted for every layer (an upper bound when `first_layer` leaves the lower ones frozen).
    per_layer = sum(lora.r * (l.inp + l.out) + (l.out if lora.use_dora else 0) for l in adapted) if lora else 0
    trainable = (layout.layers - lora.first_layer) * per_layer if lora else layout.params
    tb = 4 if lora else wb
    return _Precision(trainable, adapted, wb, tb, gb=(2 if half else 4) if zero else tb,
                      gather_b=2 if half else wb, half=half, zero=zero, autocast=half and not zero)


def _at_rest(layout: Layout, recipe: Recipe, launch: Launch, engine: str, p: _Precision) -> dict:
    """Per device between updates: weights, gradients, optimizer state and the engine's own buffers."""
    n, own, quant, zero, half = launch.processes, engine == launch.engine, recipe.model.quantization, p.zero, p.half
    if quant is not None:
        scales = 1 / 64 + 4 / (64 * 256) if quant.double_quant else 4 / 64  # per weight, blocks of 64
        frozen = layout.linear_params * (0.5 + scales) + (layout.params - layout.linear_params) * 4
    else:
        frozen = layout.params * (2 if zero and half else p.wb) if recipe.lora else 0
    weights = frozen + p.trainable * (2 if zero and half else p.tb)
    optimizer = p.trainable * ((12 if half else 8) if zero else 2 * p.tb)  # AdamW m and v (+ DeepSpeed's fp32 master)
    one_layer_gathered = layout.layer_params * p.gather_b
    buffers = 0.0
    grads = p.trainable * p.gb
    if engine == "DDP":
        buffers += p.trainable * p.gb  # buckets: DDP's own copy of the gradients
    elif engine == "FSDP":
        weights, grads, optimizer = weights / n, grads / n, optimizer / n
        if own and not launch.reshard_after_forward:  # weights stay gathered from the forward to the backward
            buffers += layout.params * p.gather_b
        else:
            buffers += 2 * one_layer_gathered  # the layer computing and the one prefetched
        if own and launch.offload_params:  # sharded weights, gradients and optimizer live in CPU memory
            weights = grads = optimizer = 0
        if recipe.train.grad_accum > 1:  # no reduce-scatter while accumulating: whole gradients on every rank
            buffers += p.trainable * (2 if half else p.tb)
    elif zero:
        grads, optimizer = grads / n, optimizer / n
        buffers += min(DS_BUCKET, p.trainable) * p.gb * 2  # reduce and all-gather buckets
        if engine == "ZeRO-3":
            weights /= n
            buffers += max(2 * one_layer_gathered, min(DS_MAX_LIVE, layout.params) * p.gather_b)
            if own and launch.offload_params:
                weights = 0
        if own and launch.offload_optimizer:  # states and the float32 master copy live in CPU memory
            optimizer = 0
    if quant is not None:
        buffers += max(l.inp * l.out for l in layout.linears) * 2  # one weight dequantized in the backward
    return {"weights": weights, "gradients": grads, "optimizer state": optimizer, "engine buffers": buffers}


def _busiest_phase(layout: Layout, recipe: Recipe, engine: str, checkpointing: bool, p: _Precision,
                   grads: float) -> dict:
    """What an update holds at its busiest moment besides the state at rest: gradients, activations, loss buffers and
    weight copies, at the end of the forward, the head's backward, the last layer's backward or the end."""
    L, h, V = layout.layers, layout.hidden, layout.vocab
    quant, zero, half, wb = recipe.model.quantization, p.zero, p.half, p.wb
    # Activations kept for the backward, per token of a micro-batch.
    T = recipe.train.batch_size * recipe.data.max_length
    rb = 4 if quant is not None else (2 if zero and half else wb)  # the residual stream
    # Matmul outputs; 4-bit layers hand back their input's dtype (float32 after peft's preparation), autocast or not.
    ab = 4 if quant is not None else (2 if half else wb)
    att_b = 2 if half else ab  # sdpa computes in bf16 under autocast
    full = recipe.lora is None
    per_layer = _layer_bytes_per_token(layout, recipe.lora, p.adapted, rb, ab, att_b, p.autocast, half)
    final = h * rb + (4 * h if rb < 4 else 0) + (2 * h * rb if full else 0)
    # Kept from the forward: every layer's activations, or with checkpointing only each layer's input.
    kept = T * ((L * h * rb if checkpointing else L * per_layer) + final)
    layer_acts = T * per_layer
    # A layer's backward holds the gradients flowing through it: the residual's and the MLP's widest.
    layer_grads = T * (h + 2 * layout.intermediate) * ab
    logits_b = 2 if zero and half or (wb == 2 and not p.autocast and quant is None) else 4
    loss_fwd = T * V * (logits_b + 4)  # the logits and the float32 gradient made beside them
    loss_bwd = T * V * (4 + (logits_b if logits_b < 4 else 0))  # the gradient, and its cast back
    head = V * h
    copies_all = copies_fwd = copies_bwd = copies_layer = 0.0
    if p.autocast and quant is None and engine != "FSDP" and wb == 4:  # FSDP gathers in bf16: nothing to cast
        copies_all = (layout.linear_params + head) * 2
        copies_layer = (layout.linear_params / L + head) * 2
        copies_fwd = copies_all if full or not checkpointing else copies_layer  # autocast caches trained weights
        copies_bwd = copies_layer if checkpointing else copies_all
    accumulated = grads if recipe.train.grad_accum > 1 else 0
    head_grad = head * p.gb if full else 0
    phases = [  # the end of the forward, the head's backward, the last layer's backward, the end of the backward
        {"gradients": accumulated, "activations": kept, "loss buffers": loss_fwd, "weight copies": copies_fwd},
        {"gradients": max(accumulated, head_grad), "activations": kept, "loss buffers": loss_bwd,
         "weight copies": copies_bwd},
        {"gradients": max(accumulated, head_grad), "loss buffers": 0, "weight copies": copies_bwd,
         "activations": kept + (layer_acts if checkpointing else 0) + layer_grads},
        {"gradients": grads, "activations": layer_acts + layer_grads, "loss buffers": 0,
         "weight copies": copies_layer},
    ]
    return max(phases, key=lambda phase: sum(phase.values()))


def _sent(layout: Layout, recipe: Recipe, launch: Launch, engine: str, p: _Precision) -> float:
    """Bytes each device sends per optimizer update (ring all-reduce, reduce-scatter and all-gather)."""
    ring = (launch.processes - 1) / launch.processes
    k = recipe.train.grad_accum
    everything = layout.params * p.gather_b  # what FSDP and ZeRO-3 gather (not offered with QLoRA)
    own = engine == launch.engine
    return {"one device": 0.0,
            "DDP": 2 * ring * p.trainable * p.gb,
            "FSDP": k * (2 if launch.reshard_after_forward or not own else 1) * ring * everything
            + ring * p.trainable * (2 if p.half else p.tb),
            "ZeRO-2": k * ring * p.trainable * p.gb + ring * p.trainable * p.gather_b,
            "ZeRO-3": k * (2 * ring * everything + ring * p.trainable * p.gb)}[engine]


def estimate(layout: Layout, recipe: Recipe, launch: Launch, engine: str, checkpointing: bool) -> Estimate:
    """Memory per device and bytes sent per update under `engine` (the launch config's offload settings apply to its
    own engine); see the module's docstring for what counts."""
    p = _precision(layout, recipe, launch, engine)
    rest = _at_rest(layout, recipe, launch, engine, p)
    busiest = _busiest_phase(layout, recipe, engine, checkpointing, p, rest["gradients"])
    parts = {"weights": rest["weights"], "gradients": busiest["gradients"], "optimizer state": rest["optimizer state"],
             "activations": busiest["activations"], "loss buffers": busiest["loss buffers"],
             "weight copies": busiest["weight copies"], "engine buffers": rest["engine buffers"]}
    return Estimate(parts, sum(parts.values()), _sent(layout, recipe, launch, engine, p), p.trainable,
                    supported=recipe.model.quantization is None or engine in ("one device", "DDP"))


# ---------------------------------------------------------------- the table


def _gib(b: float) -> str:
    return f"{b / GiB:,.1f}"


def _fits(peak: float, memory_gib: float) -> bool:
    return peak <= usable_bytes(memory_gib)


def usable_bytes(memory_gib: float) -> float:
    return (memory_gib * (1 - ALLOCATOR_SHARE) - CONTEXT_GIB) * GiB


def plan(recipe: Recipe, launch: Launch, memory_gib: float) -> str:
    """The plan as Markdown: what is trained, the table per engine, and the verdict for the launch config's engine."""
    layout = load_layout(recipe.model)
    checkpointing = recipe.model.gradient_checkpointing or launch.activation_checkpointing
    # One process: one column, the launch config's engine (a 1-process FSDP or ZeRO-3 run is a real case).
    engines = (launch.engine,) if launch.processes == 1 else ENGINES
    on = {e: estimate(layout, recipe, launch, e, checkpointing) for e in engines}
    off = {e: estimate(layout, recipe, launch, e, not checkpointing) for e in engines}
    mixed = recipe.train.mixed_precision or launch.mixed_precision or "no"
    lora, quant = recipe.lora, recipe.model.quantization
    if lora:
        what = f"LoRA r={lora.r} on {', '.join(lora.target_modules)}"
        if lora.first_layer:
            what += f" of layers {lora.first_layer}-{layout.layers - 1}"
        if quant:
            what = f"QLoRA ({quant.bits}-bit {quant.type}{', double quant' if quant.double_quant else ''}), " + what
    else:
        what = "full fine-tuning"
    trainable = on[engines[0]].trainable
    what += f" ({trainable / 1e6:,.1f}M trainable parameters, {trainable / layout.params:.2%})"
    tokens = recipe.train.batch_size * recipe.data.max_length
    lines = [
        f"model: {recipe.model.path} ({layout.source}): {layout.arch}, {layout.params / 1e9:.2f}B parameters, "
        f"{layout.layers} layers, hidden {layout.hidden:,}, vocab {layout.vocab:,}",
        f"training: {what}; weights {recipe.model.dtype}"
        + (f", {mixed} autocast" if mixed != "no" else ", no mixed precision")
        + f"; gradient checkpointing {'on' if checkpointing else 'off'}",
        f"batch: {recipe.train.batch_size} rows x {recipe.data.max_length} tokens = {tokens:,} tokens per micro-step "
        f"and process, {recipe.train.grad_accum} micro-step(s) per update, {launch.processes} process(es)",
        f"launch: {launch.source}: {launch.engine}" + (f", {launch.processes} processes" if launch.processes > 1 else ""),
        "",
    ]
    mark = {e: f"{e} (launch)" if e == launch.engine and launch.processes > 1 else e for e in engines}
    lines.append("| per device, GiB | " + " | ".join(mark[e] for e in engines) + " |")
    lines.append("|---" + "|---:" * len(engines) + "|")

    def row(label: str, cell) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(e) if on[e].supported else "n/a" for e in engines) + " |")

    for part in on[engines[0]].parts:
        row(part, lambda e, part=part: _gib(on[e].parts[part]))
    row(f"**peak, checkpointing {'on' if checkpointing else 'off'}**", lambda e: f"**{_gib(on[e].peak)}**")
    row(f"peak, checkpointing {'off' if checkpointing else 'on'}", lambda e: _gib(off[e].peak))
    row(f"fits {memory_gib:g} GiB", lambda e: "yes" if _fits(on[e].peak, memory_gib) else "no")
    if launch.processes > 1:
        row("sent per update, GiB", lambda e: _gib(on[e].sent))
    lines.append("")
    lines.append(f"Rows are the parts at the busiest moment of a step and add up to the peak. A device of "
                 f"{memory_gib:g} GiB is taken to hold {usable_bytes(memory_gib) / GiB:.1f} GiB of tensors (5% kept "
                 f"for the allocator, {CONTEXT_GIB:g} GiB for the CUDA context). Every token counts as a target.")
    if quant and launch.processes > 1:
        lines.append("n/a: finetune runs QLoRA on one device or under DDP (4-bit weights are not sharded).")
    lines.append("")
    lines.append(verdict(layout, recipe, launch, on, memory_gib, checkpointing))
    return "\n".join(lines)


def verdict(layout: Layout, recipe: Recipe, launch: Launch, on: dict, memory_gib: float, checkpointing: bool) -> str:
    engine = launch.engine
    mine = on[engine]
    where = f"under {engine} on {launch.processes} devices" if launch.processes > 1 else "on one device"
    if not mine.supported:
        return f"verdict: not supported: finetune runs QLoRA on one device or under DDP, not {engine}."
    need = f"needs about {_gib(mine.peak)} GiB per device of {memory_gib:g} GiB"
    if _fits(mine.peak, memory_gib):
        return f"verdict: fits. {where[0].upper() + where[1:]} this recipe {need}."
    hints = [f"{e}" for e, est in on.items() if est.supported and _fits(est.peak, memory_gib)]
    if not checkpointing and _fits(estimate(layout, recipe, launch, engine, True).peak, memory_gib):
        hints.insert(0, "model.gradient_checkpointing=true")
    for rows in range(recipe.train.batch_size - 1, 0, -1):
        smaller = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, batch_size=rows))
        if _fits(estimate(layout, smaller, launch, engine, checkpointing).peak, memory_gib):
            hints.append(f"train.batch_size={rows} (raise train.grad_accum to keep the global batch)")
            break
    return (f"verdict: does not fit. {where[0].upper() + where[1:]} this recipe {need}. "
            + (f"Would fit: {'; '.join(hints)}." if hints else "Nothing here makes it fit: more or larger devices, "
               "a shorter data.max_length, or LoRA / QLoRA."))
