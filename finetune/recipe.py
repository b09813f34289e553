"""The recipe: a typed schema with every default in one place, YAML loading, overrides, validation.

Every field below carries its default and a one-line doc; `finetune keys` prints them.
Validation runs before anything heavy is imported or loaded, so a typo costs seconds.

Longer than our ~450-line rule, on purpose: the schema (every section's fields with their defaults and docs) and the
code that reads YAML and overrides into it are one idea, and splitting them would put the defaults in two places.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import UserError

# Local data files by suffix, and the `datasets` builder that reads each: the one table of them.
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


class RecipeError(UserError):
    """A mistake in a recipe or an override; the message says where and what to do."""


def _f(default, doc: str, check=None, allowed: str = ""):
    """A schema field: its default, what it means, and an optional check with the allowed values."""
    meta = {"doc": doc, "check": check, "allowed": allowed}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


_positive = (lambda v: v > 0, "a number > 0")
_non_negative = (lambda v: v >= 0, "a number >= 0")


def _pos(doc, default):
    return _f(default, doc, *_positive)


def _nonneg(doc, default):
    return _f(default, doc, *_non_negative)


@dataclass
class QuantizationSection:
    bits: Literal[4] = _f(4, "bits per base weight (bitsandbytes 4-bit: QLoRA)")
    type: Literal["nf4", "fp4"] = _f("nf4", "4-bit data type: nf4 (normal float, QLoRA's) or fp4")
    double_quant: bool = _f(True, "quantize the per-block scales too (about 0.4 bits per weight less)")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = _f(
        "bfloat16", "dtype the 4-bit weights are dequantized to for each matmul")


@dataclass
class ModelSection:
    path: str = _f("", "hub id (org/name), local folder, or .gguf file")
    name: str | None = _f(None, "the hub id the model is known by, named as the base in a saved adapter and its model "
                          "card; null = model.path when it is a hub id, else the source a GGUF file records")
    dtype: Literal["float32", "bfloat16", "float16"] = _f(
        "float32", "dtype the weights are loaded in; mixed precision is separate (train.mixed_precision)"
    )
    revision: str | None = _f(None, "hub revision (branch, tag or commit) to load")
    trust_remote_code: bool = _f(False, "run modelling code shipped with the model; only for models you trust")
    allow_pickle: bool = _f(False, "also load pickle-based .bin weights (can run code); safetensors only when false")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = _f(
        "sdpa", "attention kernel; packing keeps examples apart under each (sdpa: a causal call per example, no padding)"
    )
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (non-reentrant) to save memory; on "
                                     "by default when model.quantization is set")
    quantization: QuantizationSection | None = _f(
        None, "load the base weights quantized (QLoRA: needs a lora section and bitsandbytes); null = as model.dtype")
    cache_dir: str = _f(
        "~/.cache/finetune", "where GGUF files are converted to safetensors once, and base evaluations are cached"
    )


@dataclass
class DatasetSpec:
    path: str = _f("", "hub dataset id, or a local .jsonl/.json/.csv/.parquet/.txt file")
    format: Literal["text", "instruction", "chat"] = _f("text", "how rows are turned into tokens")
    split: str = _f("train", "split to read (hub datasets and local files alike)")
    name: str | None = _f(None, "hub dataset configuration name")
    weight: float = _pos("how many times each example appears per epoch (0.5 = a random half)", 1.0)
    columns: dict[str, str] = _f(
        {},
        "rename map from our field names (text; instruction, input, output; messages) to the dataset's columns",
    )
    system: str | None = _f(None, "format chat: a system message put first in every row of this dataset, so what it "
                                  "teaches is tied to that prompt (ask for it with the same system prompt, e.g. the "
                                  "target task's `description`); null = the rows as they are")


@dataclass
class ReplaySection:
    datasets: list[DatasetSpec] = _f([], "original-task or general data mixed into training (not an eval split)")
    ratio: float = _f(0.02, "share of training tokens that come from replay (0.02 = 2%)", lambda v: 0 < v < 1,
                      "a number in (0, 1)")


@dataclass
class FisherSection:
    datasets: list[DatasetSpec] = _f([], "original-task data the base model's Fisher is measured on (not an eval split)")
    rows: int = _pos("examples of that data the Fisher is averaged over", 64)


@dataclass
class KLToBaseSection:
    weight: float = _pos("strength: adds weight * KL(base || tuned), the mean over the KL positions of each update's "
                         "rows, to the loss", 1.0)
    datasets: list[DatasetSpec] = _f([], "general prompts (any format; chat rows in the chat template) on whose target "
                                         "tokens the tuned model's next-token distributions are kept near the base's")
    rows_per_step: int = _pos("rows of that data per optimizer update, over all processes together", 4)
    first_tokens: int | None = _f(None, "only the first N tokens of each reply are kept near the base (where its "
                                        "format is decided); null = every reply token",
                                  lambda v: v is None or v > 0, "an integer > 0 or null")


@dataclass
class DataSection:
    train: list[DatasetSpec] = _f([], "datasets to train on, mixed by weight")
    validation: list[DatasetSpec] = _f([], "datasets for validation loss; empty = hold out val_fraction of train")
    val_fraction: float = _f(0.0, "fraction of training examples held out for validation loss", lambda v: 0 <= v < 1,
                             "a number in [0, 1)")
    max_length: int = _pos("tokens per example (truncated beyond) and per packed row", 1024)
    packing: bool = _f(True, "pack several examples into each row; attention and positions stay per example")
    train_on: Literal["responses", "all"] = _f(
        "responses", "which tokens are targets: assistant/response tokens only, or every token"
    )
    chat_template: str | None = _f(None, "Jinja chat template to use instead of the tokenizer's")
    on_bad_row: Literal["fail", "skip"] = _f("fail", "a malformed row stops the run, or is skipped and counted")
    num_proc: int | None = _f(None, "processes for tokenization (datasets.map); null = one per CPU core for a "
                              "dataset over 10,000 rows, else 1", lambda v: v is None or v > 0, "an integer > 0 or null")
    replay: ReplaySection | None = _f(None, "mix old data into training to forget less; null = none")


@dataclass
class TrainSection:
    lr: float = _pos("peak learning rate", 2.0e-4)
    max_steps: int | None = _f(None, "optimizer updates to run; null = run `epochs` epochs", lambda v: v is None or v > 0,
                               "an integer > 0 or null")
    epochs: int = _pos("epochs to run when max_steps is null", 1)
    batch_size: int = _pos("rows per process per micro-step", 8)
    grad_accum: int = _pos("micro-steps per optimizer update", 1)
    seed: int = _nonneg("seed for weights init (LoRA), data order and dropout", 0)
    schedule: Literal["cosine", "linear", "constant"] = _f("cosine", "learning-rate schedule after warmup")
    warmup_steps: int = _nonneg("optimizer updates of linear warmup", 0)
    weight_decay: float = _nonneg("AdamW weight decay", 0.0)
    betas: list[float] = _f([0.9, 0.999], "AdamW betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
                            "two numbers in [0, 1)")
    max_grad_norm: float | None = _f(1.0, "clip the global gradient norm to this; null = no clipping",
                                     lambda v: v is None or v > 0, "a number > 0 or null")
    mixed_precision: Literal["no", "bf16", "fp16"] | None = _f(
        None, "autocast precision; null = take it from the accelerate launch config"
    )
    l2sp: float = _nonneg("pull toward the base: adds l2sp * ||theta - theta_base||^2 to the loss (LoRA: over the "
                          "adapter's update); 0 = off", 0.0)
    l2sp_fisher: FisherSection | None = _f(
        None, "EWC: weight the pull per weight by the base model's diagonal Fisher on this data (normalised to mean "
        "1, so l2sp keeps its scale); null = every weight alike")
    kl_to_base: KLToBaseSection | None = _f(
        None, "stay close to the base model's predictions on general prompts (Learning without Forgetting); with "
        "LoRA the base is the same model with the adapter off, full fine-tuning keeps a frozen copy; null = off")
    compile: bool = _f(False, "torch.compile the model (dynamic shapes): fuses the small ops between matmuls; the "
                       "first steps compile (seconds for a tiny model, minutes for 135M on 2 CPU cores)")
    max_nonfinite_in_row: int = _nonneg(
        "updates with a non-finite loss or gradient skipped in a row before the run stops; 0 = stop at the first", 3)
    log_every: int = _pos("optimizer updates between metrics.jsonl lines", 1)
    probe_every: int | None = _f(
        0, "cheap probes of forgetting into metrics.jsonl (KL to the base on the new task's first rows and at the first "
           "reply token of general prompts, the new task's answers leaking into them): 0 = after the last power of "
           "two within the first 10% of updates, the powers of two after it up to 16, then every 16 (for 60 "
           "updates: 4, 8, 16, 32, 48), within train.probe_budget; N = every N updates and the last; null = off",
        lambda v: v is None or v >= 0, "an integer >= 0 or null")
    probe_budget: float | None = _f(
        0.05, "with train.probe_every: 0, the share of the updates' time the probes may take: a probe after the "
              "first is left out where it would take them over it (the run's time forecast from its updates so "
              "far); null = every probe of the schedule", lambda v: v is None or 0 <= v <= 1,
        "a share between 0 and 1, or null")
    eval_every: int = _nonneg("optimizer updates between validation-loss passes; 0 = only at the end", 0)
    trackers: list[Literal["tensorboard", "wandb"]] = _f([], "accelerate trackers to log to, besides metrics.jsonl")


@dataclass
class LoraSection:
    r: int = _pos("adapter rank", 16)
    alpha: float = _pos("adapter scale numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)", 32.0)
    dropout: float = _f(0.0, "dropout on the adapter input", lambda v: 0 <= v < 1, "a number in [0, 1)")
    target_modules: list[str] = _f(["all-linear"], "module names to adapt; [all-linear] = every linear but the head")
    use_dora: bool = _f(False, "weight-decomposed LoRA (DoRA)")
    use_rslora: bool = _f(False, "rank-stabilised scaling alpha / sqrt(r)")
    first_layer: int = _nonneg("adapt the decoder layers from this one up (counted from 0 at the input); the layers "
                               "below keep the base's weights, and with them its lower-level features; 0 = every "
                               "layer", 0)
    wise_ft_alpha: float = _f(1.0, "WiSE-FT at the end of training: after the last update the adapter's update is "
                              "scaled by this, theta_base + alpha * (theta_tuned - theta_base), before final/ is saved "
                              "and measured (finetune interpolate measures several alphas after a run); 1 = off",
                              lambda v: 0 < v <= 1, "a number in (0, 1]")


@dataclass
class EvalSection:
    tasks: list[str] = _f([], "original tasks checked for forgetting (lm-eval names or task YAML files)")
    max_drop: float = _nonneg(
        "forgetting budget: the largest acceptable drop on an original task, in its metric's units (0.02 = 2 points); "
        "PASS needs every task's 95% interval above -max_drop, so n must be large enough to resolve it", 0.02)
    target_tasks: list[str] = _f([], "tasks that measure the new skill (lm-eval names or task YAML files); "
                                     "reported as gain")
    every: int = _nonneg("optimizer updates between forgetting evaluations during training; 0 = only before and "
                         "after", 0)
    limit: int | None = _f(None, "examples per task (the first N); null = all. Fewer examples widen every "
                           "interval: the verdict may be INCONCLUSIVE where all examples would decide it",
                           lambda v: v is None or v > 0, "an integer > 0 or null")
    batch_size: int = _pos("examples per forward pass in task evaluation (generation batches: 32 rows decode in about "
                           "the time of 8, where each step reads every weight)", 32)
    share_prefixes: bool = _f(True, "encode a multiple-choice prompt once for all its options, and a batch's common "
                                    "prompt prefix (few-shot turns) once for its generations: lm-eval's scores up to "
                                    "float rounding, ~3x less compute; false = lm-eval's own path")
    mixed_precision: Literal["auto", "no", "bf16"] = _f(
        "auto", "autocast of evaluation forward passes (tasks and drift): auto = bf16 where the hardware computes in "
                "it (GPUs with bf16, CPUs with AMX or AVX512-BF16), else none; scores may move by an example or two, "
                "and the base's cached scores are kept apart per choice")
    backend: Literal["hf", "vllm"] = _f(
        "hf", "what scores the tasks: hf = finetune's in-memory transformers model (lm-eval's HFLM); vllm = lm-eval's "
              "own vLLM model (CUDA GPUs, `pip install vllm`; one process: vLLM spreads a model over GPUs itself), "
              "served from model.path and the tuned adapter or weights saved aside. The drift is measured by "
              "transformers either way")
    vllm_args: dict[str, Any] = _f({}, "with backend vllm: lm-eval's model_args for it (tensor_parallel_size, "
                                       "max_model_len, gpu_memory_utilization, ...); default: batches sized by vLLM, "
                                       "0.85 of the GPU memory free when it starts, the model's dtype")
    apply_chat_template: bool = _f(False, "prompt the tasks through the tokenizer's chat template (instruct "
                                          "models; target tasks trained in chat format)")
    drift_texts: list[str] = _f([], "text files (.txt, one text per line) or .jsonl files (a `text` column) to "
                                    "measure raw-text drift on; empty = continuations the base model writes for 100 "
                                    "shipped prompts (chat models are also measured on their replies to 100 chat "
                                    "requests)")
    drift_max_length: int = _pos("tokens per drift text (truncated beyond)", 256)
    on_over_budget: Literal["continue", "keep_best", "stop"] = _f(
        "continue", "the budget policy during training: continue = train on, report only; keep_best = train on, "
                    "then final/ is the evaluated step whose verdict is PASS that gained most on target_tasks (the "
                    "latest, without them); stop = as keep_best, and end training at the first evaluation whose "
                    "verdict is FAIL, or at a forecast of FAIL beyond doubt (eval.forecast_calibration)")
    forecast_calibration: str | None = _f(
        None, "a calibration file of earlier runs of the same model and tasks (bench/forecast_calibration.py writes "
              "one; bench/forecast/runs.jsonl is the demo model's): after the last probe within the first 10% of "
              "updates, forecast each original task's final change with a 90% prediction interval and the odds of "
              "each verdict, into the progress output, metrics.jsonl and the report, and again after each later "
              "probe (but the last) that calibration runs have at the same share of their updates; needs "
              "train.probe_every; null = no forecast")


@dataclass
class OutputSection:
    dir: str = _f("", "run folder; default runs/<recipe file name>")
    save_every: int = _nonneg("optimizer updates between checkpoints; 0 = only the final model", 50)
    keep: int = _pos("checkpoints kept (the newest)", 3)


@dataclass
class Recipe:
    model: ModelSection = _f(None, "the pretrained model")
    data: DataSection = _f(None, "training and validation data")
    train: TrainSection = _f(None, "optimisation")
    lora: LoraSection | None = _f(None, "LoRA adapter; absent or null = full fine-tuning")
    eval: EvalSection = _f(None, "original tasks and forgetting budget")
    output: OutputSection = _f(None, "where the run writes")


# Sections a recipe gets even when the YAML leaves them out; `lora` stays None (full fine-tuning).
_DEFAULT_SECTIONS = ("data", "train", "eval", "output")

# Keys whose change does not change the trained weights: a resumed run may differ in these.
RESULT_NEUTRAL_KEYS = frozenset(
    {"output.save_every", "output.keep", "train.log_every", "train.trackers", "train.eval_every", "data.num_proc",
     "train.probe_every", "eval.backend", "eval.vllm_args",
     "model.cache_dir", "model.name", "eval.tasks", "eval.target_tasks", "eval.limit", "eval.batch_size",
     "eval.share_prefixes", "eval.drift_texts", "eval.drift_max_length", "eval.apply_chat_template"}
)


# Names other toolkits (transformers, TRL, peft, axolotl) use for our keys: the hint for an unknown key.
_ALIASES = {
    "learning_rate": "lr", "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "max_seq_length": "max_length", "sequence_len": "max_length",
    "num_train_epochs": "epochs", "num_epochs": "epochs", "lr_scheduler_type": "schedule", "output_dir": "dir",
    "save_steps": "save_every", "save_total_limit": "keep", "logging_steps": "log_every", "eval_steps": "eval_every",
    "model_name_or_path": "path", "torch_dtype": "dtype", "max_grad_norm": "max_grad_norm",
}


# ---------------------------------------------------------------- conversion from plain data


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        scalars = "strings" if typing.get_args(tp)[1] is str else "numbers, strings or booleans"
        return f"a mapping of names to {scalars}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _convert(value: Any, tp, where: str, src: str):
    """Turn YAML data into the annotated type, or raise a RecipeError naming the key."""
    origin = typing.get_origin(tp)
    bad = RecipeError(f"{src}: `{where}` is {value!r}; it must be {_type_name(tp)}.")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, where, src)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):
            # YAML 1.1 reads the words no/off/false and yes/on/true as booleans: `mixed_precision: no` arrives as
            # False. Take the one choice that YAML would have read as this value.
            words = [c for c in choices if isinstance(c, str) and yaml.safe_load(c) is value]
            value = words[0] if len(words) == 1 else value
        if value not in choices:
            raise bad
        return value
    if origin is list:
        if not isinstance(value, list):
            # One item where a list is expected is a common shorthand (`tasks: hellaswag`).
            value = [value]
        (inner,) = typing.get_args(tp)
        return [_convert(v, inner, f"{where}[{i}]", src) for i, v in enumerate(value)]
    if origin is dict:
        kinds = str if typing.get_args(tp)[1] is str else (str, int, float, bool)  # dict[str, Any]: scalars
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, kinds)
                                                  for k, v in value.items()):
            raise bad
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, where, src)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        # YAML 1.1 reads `2e-4` (no dot) as a string; numbers are parsed here, at the edge.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise RecipeError(f"{src}: `{where}` is {value!r}; it must be a non-empty string.")
        return value
    raise TypeError(f"schema type {tp} is not handled")


def _build(cls, data: dict, prefix: str, src: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = [_ALIASES[key]] if _ALIASES.get(key) in fields else difflib.get_close_matches(
                str(key), list(fields), n=1, cutoff=0.5)
            hint = f" Did you mean `{_join(prefix, close[0])}`?" if close else ""
            valid = ", ".join(fields)
            raise RecipeError(
                f"{src}: unknown key `{_join(prefix, key)}`.{hint} Valid keys{' in ' + prefix if prefix else ''}: {valid}."
            )
    kwargs = {}
    for name, f in fields.items():
        where = _join(prefix, name)
        if name in data:
            value = _convert(data[name], hints[name], where, src)
        elif cls is Recipe and name in _DEFAULT_SECTIONS:
            value = _build(typing.get_args(hints[name])[0] if typing.get_origin(hints[name]) else hints[name], {},
                           where, src)
        else:
            continue
        check, allowed = f.metadata["check"], f.metadata["allowed"]
        if check is not None and value is not None and not check(value):
            raise RecipeError(f"{src}: `{where}` is {data[name]!r}; it must be {allowed}.")
        kwargs[name] = value
    return cls(**kwargs)


def _join(prefix: str, key) -> str:
    key = str(key) if str(key).isprintable() else repr(str(key))[1:-1]  # a newline in a key: `\n`, on one line
    return f"{prefix}.{key}" if prefix else key


# ---------------------------------------------------------------- loading, overrides, checks


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r} must look like section.key=value (e.g. train.lr=1e-4 or lora=null).")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).replace("\n", " ")
            raise RecipeError(f"override {item!r}: the value is not valid YAML ({problem}).") from None
        parsed.append((key.split("."), value))
    return parsed


def _apply_override(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            # `lora.r=8` on a recipe without LoRA turns LoRA on with defaults for the other keys.
            child = node[k] = {}
        if isinstance(child, list):
            raise RecipeError(f"override `{'.'.join(keys)}`: `{k}` is a list; set it whole, e.g. {k}=[...].")
        if not isinstance(child, dict):
            raise RecipeError(f"override `{'.'.join(keys)}`: `{k}` is not a section.")
        node = child
    node[keys[-1]] = value


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a recipe file, apply `key=value` overrides, validate; raises RecipeError on any mistake."""
    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {src} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{src} is not UTF-8 text (byte {e.start}); save it as UTF-8.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{src} is not valid YAML{where}: {getattr(e, 'problem', e)}.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{src} must be a mapping of sections (model, data, train, ...), not {type(data).__name__}.")
    for keys, value in parse_overrides(list(overrides)):
        _apply_override(data, keys, value)
    recipe = _build(Recipe, data, "", src)
    if recipe.model is not None and recipe.model.quantization is not None and \
            "gradient_checkpointing" not in data["model"]:
        recipe.model.gradient_checkpointing = True  # QLoRA's setting: its point is fitting a model that is tight
    _check(recipe, src, path.stem)
    return recipe


def saved_model_section(path: Path) -> ModelSection | None:
    """The `model` section of a run's saved recipe.yaml, read as data (typed, defaults filled in) and not checked
    against the current folder: commands that use a finished run need its model, not its training data's paths."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    model = data.get("model") if isinstance(data, dict) else None
    return _build(ModelSection, model, "model", str(path)) if isinstance(model, dict) else None


def _check(recipe: Recipe, src: str, stem: str) -> None:
    if recipe.model is None or not recipe.model.path:
        raise RecipeError(f"{src}: `model.path` is missing; give a hub id, a local folder or a .gguf file.")
    model_path = _expand(recipe.model.path)
    if (model_path.suffix == ".gguf" or _looks_local(recipe.model.path)) and not model_path.exists():
        raise RecipeError(f"{src}: `model.path` {recipe.model.path} does not exist{_near(model_path)} (paths are "
                          f"relative to the folder you run from, {Path.cwd()}).")
    if not recipe.data.train:
        raise RecipeError(f"{src}: `data.train` is empty; list at least one dataset, e.g. "
                          "train: [{path: data/x.jsonl, format: chat}].")
    replay = recipe.data.replay.datasets if recipe.data.replay else []
    if recipe.data.replay and not replay:
        raise RecipeError(f"{src}: `data.replay.datasets` is empty; list the data to replay, or set `data.replay: "
                          "null`.")
    fisher = recipe.train.l2sp_fisher.datasets if recipe.train.l2sp_fisher else []
    if recipe.train.l2sp_fisher and not fisher:
        raise RecipeError(f"{src}: `train.l2sp_fisher.datasets` is empty; list original-task data to measure the "
                          "Fisher on, or set `train.l2sp_fisher: null`.")
    if recipe.model.quantization is not None:
        if recipe.lora is None:
            raise RecipeError(f"{src}: `model.quantization` loads the base weights in 4 bits, which cannot be trained "
                              "(full fine-tuning updates them); QLoRA trains a LoRA adapter on top. Add a `lora` "
                              "section (e.g. lora.r=16), or set `model.quantization: null` for full fine-tuning.")
        if recipe.train.l2sp_fisher is not None:
            raise RecipeError(f"{src}: `train.l2sp_fisher` needs gradients of the base weights, which are 4-bit "
                              "(`model.quantization`); use plain `train.l2sp`, or set `model.quantization: null`.")
    if recipe.train.l2sp_fisher and not recipe.train.l2sp:
        raise RecipeError(f"{src}: `train.l2sp_fisher` weights the pull toward the base, which is off "
                          "(`train.l2sp: 0`); set `train.l2sp` above 0, e.g. train.l2sp=0.1.")
    kl = recipe.train.kl_to_base.datasets if recipe.train.kl_to_base else []
    if recipe.train.kl_to_base and not kl:
        raise RecipeError(f"{src}: `train.kl_to_base.datasets` is empty; list general prompts to keep the base's "
                          "predictions on (e.g. data/general/self_replay.jsonl, format chat), or set "
                          "`train.kl_to_base: null`.")
    for group, specs in (("data.train", recipe.data.train), ("data.validation", recipe.data.validation),
                         ("data.replay.datasets", replay), ("train.l2sp_fisher.datasets", fisher),
                         ("train.kl_to_base.datasets", kl)):
        for i, spec in enumerate(specs):
            key = f"{group}[{i}].path"
            if not spec.path:
                raise RecipeError(f"{src}: `{key}` is missing.")
            if _looks_local(spec.path) and not _expand(spec.path).is_file():
                raise RecipeError(f"{src}: `{key}`: file {spec.path} does not exist{_near(_expand(spec.path))} "
                                  f"(paths are relative to the folder you run from, {Path.cwd()}).")
            spec.path = str(_expand(spec.path)) if _looks_local(spec.path) else spec.path
            if spec.system is not None and spec.format != "chat":
                raise RecipeError(f"{src}: `{group}[{i}].system` is a system message for chat rows; this dataset's "
                                  f"format is `{spec.format}`. Use format chat, or remove `system`.")
    calibration = recipe.eval.forecast_calibration
    if calibration is not None:
        if not _expand(calibration).is_file():
            raise RecipeError(f"{src}: `eval.forecast_calibration`: file {calibration} does not exist"
                              f"{_near(_expand(calibration))} (bench/forecast_calibration.py writes one), or set it "
                              "to null.")
        if recipe.train.probe_every is None:
            raise RecipeError(f"{src}: `eval.forecast_calibration` forecasts from the probes, which are off "
                              "(`train.probe_every: null`); set `train.probe_every: 0`, or "
                              "`eval.forecast_calibration: null`.")
        recipe.eval.forecast_calibration = str(_expand(calibration))
    if recipe.lora is not None and recipe.lora.wise_ft_alpha < 1:
        if recipe.lora.use_dora:
            raise RecipeError(f"{src}: `lora.wise_ft_alpha` scales the adapter's update, which for DoRA is not an "
                              "interpolation (its magnitude vector renormalises the weights); set "
                              "`lora.use_dora: false` or `lora.wise_ft_alpha: 1`.")
        if recipe.eval.on_over_budget != "continue":
            raise RecipeError(f"{src}: `lora.wise_ft_alpha` scales the last model, while `eval.on_over_budget: "
                              f"{recipe.eval.on_over_budget}` may make an earlier, unscaled one final/; set "
                              "`eval.on_over_budget: continue` or `lora.wise_ft_alpha: 1`.")
    if recipe.data.validation and recipe.data.val_fraction:
        raise RecipeError(f"{src}: set either `data.validation` or `data.val_fraction`, not both.")
    if recipe.train.warmup_steps and recipe.train.max_steps and recipe.train.warmup_steps > recipe.train.max_steps:
        raise RecipeError(f"{src}: `train.warmup_steps` ({recipe.train.warmup_steps}) exceeds `train.max_steps` "
                          f"({recipe.train.max_steps}).")
    if not recipe.output.dir:
        recipe.output.dir = str(Path("runs") / stem)
    out = _expand(recipe.output.dir)
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise RecipeError(f"{src}: `output.dir` {recipe.output.dir} cannot be a run folder: {blocking} is a file. "
                          "Set `output.dir` to a folder (new, or a run folder to resume).")


def _expand(p: str) -> Path:
    return Path(p).expanduser()


def _looks_local(p: str) -> bool:
    """A path that can only mean a local file or folder. Hub ids look like org/name: a name with a second slash, or
    whose first part is a folder here (`data/tiny-lama` beside `data/`), is a local path with a typo, not a hub id."""
    parts = Path(p).parts
    return (p.startswith(("/", "./", "../", "~")) or p.lower().endswith(tuple(LOCAL_BUILDERS) + (".gguf",))
            or _expand(p).exists() or len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir()))


def _near(path: Path) -> str:
    """"; did you mean data/tiny-llama?" when the folder holds a name close to the missing one."""
    folder = path.parent
    if not folder.is_dir():
        return f" (no folder {folder})" if str(folder) not in ("", ".") else ""
    close = difflib.get_close_matches(path.name, [c.name for c in folder.iterdir()], n=1, cutoff=0.6)
    return f"; did you mean {folder / close[0]}?" if close else ""


# ---------------------------------------------------------------- output


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = _join(prefix, k)
        if isinstance(v, dict) and k != "columns":
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def changed_keys(old: dict, new: dict) -> list[str]:
    """Keys whose values differ between two resolved recipes and that change the training result. A key the old
    recipe lacks (saved by an earlier finetune, before the key existed) is no change while the new recipe leaves it
    at its default: that run was made the default's way."""
    a, b = flatten(old), flatten(new)
    defaults = _defaults()
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and k not in RESULT_NEUTRAL_KEYS
            and not (k not in a and k in defaults and b[k] == defaults[k])]


def _defaults() -> dict[str, Any]:
    """Every key's default, flattened as `flatten` does, for the sections that have one without any input."""
    out = {}
    for name, cls in _sections():
        try:
            out.update(flatten(dataclasses.asdict(cls()), name))
        except TypeError:  # a section with a required key (the model's path)
            continue
    return out


def _sections() -> list[tuple[str, type]]:
    """(name, dataclass) of each recipe section, an optional one (`lora`) included."""
    hints = typing.get_type_hints(Recipe)
    return [(f.name, hints[f.name] if dataclasses.is_dataclass(hints[f.name])
             else next(a for a in typing.get_args(hints[f.name]) if a is not type(None)))
            for f in dataclasses.fields(Recipe)]


def describe_changes(old: dict, new: dict, keys: list[str]) -> list[str]:
    """`data.train[0].columns: {} -> {'text': 'body'}` for each changed key: lists and mappings are followed down to
    the values that differ, so a change inside one dataset is not shown as two whole lists."""
    before, after = flatten(old), flatten(new)
    lines: list[str] = []
    for key in keys:
        _diff(before.get(key), after.get(key), key, lines)
    return lines


def _diff(a, b, where: str, lines: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict) and a and b:
        for k in [*a, *(k for k in b if k not in a)]:
            if a.get(k) != b.get(k):
                _diff(a.get(k), b.get(k), f"{where}.{k}", lines)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                _diff(x, y, f"{where}[{i}]", lines)
    else:
        lines.append(f"{where}: {a!r} -> {b!r}")


def describe_keys() -> str:
    """Every recipe key with its default and meaning: the one place defaults are documented."""
    lines = []
    for section, (_, cls) in zip(dataclasses.fields(Recipe), _sections()):
        lines.append(f"{section.name}:  # {section.metadata['doc']}")
        _describe(cls, "  ", lines)
    return "\n".join(lines)


def _describe(cls, indent: str, lines: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "(required)" if f.name == "path" else json.dumps(default)
        lines.append(f"{indent}{f.name}: {shown}  # {f.metadata['doc']}; {_type_name(hints[f.name])}")
        inner = typing.get_args(hints[f.name])
        if typing.get_origin(hints[f.name]) is list and inner and dataclasses.is_dataclass(inner[0]):
            lines.append(f"{indent}  # each item:")
            _describe(inner[0], indent + "    ", lines)
        elif inner and dataclasses.is_dataclass(inner[0]):  # an optional section: its keys once it is set
            lines.append(f"{indent}  # when set:")
            _describe(inner[0], indent + "    ", lines)
