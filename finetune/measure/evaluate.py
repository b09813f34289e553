"""A run's forgetting evaluation: the base model measured before training (its results cached across runs), the
tuned model after, optionally every `eval.every` updates, with the drift from the base.

In a launch of several processes the ranks share the work: each measures with a whole model of its own (the
unwrapped model under DDP, a gathered copy under FSDP and DeepSpeed: gather.whole_model) its share of every task's
documents and of the drift texts (sharing.py), and every rank gets all the results, the same as one process's
example by example. The main process alone reads and writes the base-result cache and the curve file.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import sys
from contextlib import contextmanager, nullcontext
from importlib.metadata import version
from pathlib import Path

import torch

from ..files import atomic_write_text, read_jsonl
from ..model import adapter_merged, load_model, output_layer, resolve_model_path
from ..precision import cast_once, eval_autocast
from ..recipe import EvalSection, ModelSection
from ..reports.records import Evaluation, TaskScore, from_dict, to_dict
from . import prefix_sharing, vllm_backend
from .drift import (
    DRAW,
    GENERATION_BATCH,
    LAYOUT,
    NEW_TOKENS,
    PROMPTS,
    SAMPLING_SEED,
    TOKENS_PER_PASS,
    AdapterDisabled,
    head_inputs,
    kl_drift,
    read_texts,
    sample_chat,
    sample_texts,
)
from .sharing import Ranks
from .tasks import EvalError, evaluate_loaded, evaluate_with, load_tasks, preserved_rng

# ---------------------------------------------------------------- caches


def model_identity(section: ModelSection) -> dict:
    """What names the base weights in cache keys: their folder with each file's size and modification time (a
    hub model's is its snapshot folder, named by commit), and the dtype they are loaded in."""
    path = resolve_model_path(section)
    if not Path(path).is_dir():
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, revision=section.revision, local_files_only=True)
    files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(path).iterdir())
             if p.suffix in (".safetensors", ".bin", ".json")}
    identity = {"path": str(Path(path).resolve()), "files": files, "dtype": section.dtype}
    if section.quantization is not None:  # a 4-bit base scores differently; unquantized keys stay as they were
        identity["quantization"] = dataclasses.asdict(section.quantization)
    return identity


def tokenizer_identity(tokenizer) -> str:
    """A hash of the tokenizer actually used: its vocabulary and rules, special tokens and chat template (a recipe's
    `data.chat_template` replaces the model's, and changes every prompt under apply_chat_template)."""
    if hasattr(tokenizer, "backend_tokenizer"):
        # Without its padding and truncation state, which every padded call changes and which scores do not see.
        state = json.loads(tokenizer.backend_tokenizer.to_str())
        backend = json.dumps({k: v for k, v in state.items() if k not in ("padding", "truncation")}, sort_keys=True)
    else:
        backend = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    parts = [backend, tokenizer.chat_template or "", json.dumps(tokenizer.special_tokens_map, sort_keys=True,
                                                                default=str)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _stable(value) -> str:
    """A JSON stand-in for what task configs hold besides data: for a function (a custom loader, a `!function`
    filter or prompt), its source code, so an edit to it changes the fingerprint; never its address."""
    try:
        return hashlib.sha256(inspect.getsource(value).encode()).hexdigest()
    except (OSError, TypeError):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"


def task_fingerprint(tasks: dict, limit: int | None) -> str:
    """A hash of what decides a task's score besides the model: every leaf task's config (functions by their
    source), the documents evaluated and the few-shot documents (content, not file names: a data file edited in
    place gets a new fingerprint)."""
    digest = hashlib.sha256()
    for name in sorted(tasks):
        task = tasks[name]
        docs = task.eval_docs
        n = len(docs) if limit is None else min(limit, len(docs))
        digest.update(json.dumps([name, task.dump_config()], sort_keys=True, default=_stable).encode())
        for i in range(n):
            digest.update(json.dumps(docs[i], sort_keys=True, default=str).encode())
        for doc in (task.fewshot_docs() or []) if task.config.num_fewshot else []:
            digest.update(json.dumps(doc, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _write_json(path: Path, value) -> None:
    """Written aside, then renamed: a crash never leaves half a cache file that a later run would trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(value))


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- a run's measurements


def _is_peft(model) -> bool:
    import peft

    return isinstance(model, peft.PeftModel)


class ForgettingEval:
    """Forgetting of one run, measured against its base model. The calls, in order:

        fe = ForgettingEval(recipe.eval, recipe.model, tokenizer, curve_file=run/"forgetting"/"curve.jsonl",
                            resumed_step=progress["step"], ranks=Ranks.of(accelerator))
        fe.evaluate_base(model)          # before training; cached across runs of the same base, tasks and settings
        fe.evaluate(model, step)         # every eval.every updates, and after the last: appended to fe.curve

    `model` is a whole model holding the weights to measure (the unwrapped model being trained, or a whole copy of
    it). A peft model is its own base with the adapter switched off; for full fine-tuning the base is loaded again
    from model.path for the drift, then freed. With several `ranks` every call is collective: each rank scores its
    share of the documents and drift texts with its own whole model, every rank ends with the same results, and the
    main process alone reads and writes the cache and the curve file.
    """

    def __init__(self, section: EvalSection, model_section: ModelSection, tokenizer, *,
                 curve_file: Path | None = None, resumed_step: int = 0, ranks: Ranks = Ranks()):
        both = set(section.tasks) & set(section.target_tasks)
        if both:
            raise EvalError(f"{sorted(both)} are listed in both eval.tasks and eval.target_tasks; a task measures "
                            "either what must not be forgotten or what is learned.")
        self.section, self.model_section, self.tokenizer = section, model_section, tokenizer
        self.cache_dir = Path(model_section.cache_dir).expanduser()
        # The base's scores are cached under what decides them: the weights, and the tokenizer and chat template used.
        self.identity = {**model_identity(model_section), "tokenizer": tokenizer_identity(tokenizer)}
        # By kind: "text" (the user's files, or sampled from the base in evaluate_base) and, for a tokenizer with a
        # chat template, "chat" (the base's replies in that template, sampled in evaluate_base).
        self.texts: dict[str, list] = {"text": read_texts(section.drift_texts)} if section.drift_texts else {}
        self.base: Evaluation | None = None
        # By kind: what the base's output layer saw at the texts' measured positions (drift.head_inputs; None where
        # the model's logits are more than that layer's output), so that each measurement runs the tuned model alone.
        self.base_inputs: dict[str, list | None] = {}
        self._base_head = None  # the base's output layer, for a model that trains its own (not an adapter's base)
        self.ranks = ranks
        # `precision`: what was chosen and why, for the run's output and the report's footer.
        self.autocast, self.precision = eval_autocast(section.mixed_precision, eval_device())
        if section.backend == "vllm":
            self.precision = f"tasks scored by lm-eval's vllm model; drift: {self.precision}"
        if ranks.main and section.mixed_precision == "auto":
            print(f"evaluation: {self.precision}", file=sys.stderr)
        self.curve_file = curve_file if ranks.main else None
        self.curve: list[Evaluation] = []  # every tuned evaluation, in step order
        if self.curve_file is not None and curve_file.is_file():
            # Points past the checkpoint we resume from describe updates that are about to be redone.
            points = [from_dict(Evaluation, d) for d in read_jsonl(curve_file)]
            self.curve = [e for e in points if e.step <= resumed_step]
            atomic_write_text(curve_file, "".join(json.dumps(to_dict(e)) + "\n" for e in self.curve))
        self.curve = ranks.from_main(self.curve)

    def _cache_path(self, kind: str, *parts) -> Path:
        key = hashlib.sha256(json.dumps([self.identity, *parts], sort_keys=True, default=str).encode())
        return self.cache_dir / kind / f"{key.hexdigest()[:20]}.json"

    @preserved_rng()
    def evaluate_base(self, model=None) -> Evaluation:
        """The base model's scores, and the drift texts it samples; each from the cache under
        <model.cache_dir> when this base was measured the same way before. `model` holds the base weights (the
        model about to be trained; a peft model's adapter is switched off), or None to load them when needed."""
        specs = self.section.tasks + self.section.target_tasks
        settings = {"lm_eval": version("lm_eval"), "limit": self.section.limit, "batch_size": self.section.batch_size,
                    "chat": self.section.apply_chat_template,
                    **({"scoring": prefix_sharing.SCORING} if self.section.share_prefixes else {}),
                    **({"autocast": str(self.autocast)} if self.autocast is not None else {}),
                    **({"backend": "vllm", "vllm_args": self.section.vllm_args} if self.served_apart else {})}
        loaded = {spec: load_tasks(spec) for spec in specs}
        kinds = {"text": sample_texts, **({"chat": sample_chat} if self.tokenizer.chat_template else {})}
        # The main process alone reads the cache and decides what is missing, so that every rank takes the same
        # branch below (on several machines, each would read its own disk).
        scores, missing, texts_paths, to_sample, to_encode, inputs_paths = {}, [], {}, [], [], {}
        if self.ranks.main:
            paths = {spec: self._cache_path("base_eval", settings, task_fingerprint(tasks, self.section.limit))
                     for spec, (_, tasks) in loaded.items()}
            scores = {spec: from_dict(TaskScore, _read_json(path)) for spec, path in paths.items() if path.is_file()}
            # Entries cached before finetune kept lm-eval's samples are measured again, once, to have them.
            scores = {spec: score for spec, score in scores.items() if score.log}
            missing = [spec for spec in specs if spec not in scores]
            # The texts depend on the batch (one seeded stream drawn batch by batch) and on the precision.
            sampling = [GENERATION_BATCH, DRAW, *([str(self.autocast)] if self.autocast is not None else [])]
            texts_paths = {kind: self._cache_path("drift", kind, PROMPTS[kind], NEW_TOKENS, SAMPLING_SEED, *sampling)
                           for kind in kinds if kind not in self.texts}
            to_sample = [kind for kind, path in texts_paths.items() if not path.is_file()]
            print(f"measuring the base model on {len(missing)} task(s) (once; cached for later runs)" if missing else
                  f"the base model's scores: from the cache ({self.cache_dir})", file=sys.stderr)
            self.texts.update({kind: _read_json(path) for kind, path in texts_paths.items() if kind not in to_sample})
            inputs_paths = {kind: self._inputs_path(kind, texts) for kind, texts in self.texts.items()}
            to_encode = to_sample + [kind for kind, path in inputs_paths.items() if not path.is_file()]
        missing, to_sample, to_encode = self.ranks.from_main((missing, to_sample, to_encode))
        fresh, in_memory = {}, bool(missing) and not self.served_apart
        if missing and self.served_apart:  # vLLM loads the base from its folder: nothing to load here
            fresh = self._scores(None, {spec: loaded[spec] for spec in missing})
        if model is not None and not _is_peft(model):
            # Training will change this model's output layer; the drift needs the base's.
            self._base_head = copy.deepcopy(output_layer(model))
        with self._plain_base(model) if in_memory or to_sample or to_encode else nullcontext() as base:
            with cast_once(self.autocast, base), prefix_sharing.kept_prefixes():
                if in_memory:
                    fresh = self._scores(base, {spec: loaded[spec] for spec in missing})
                # Sampled by one process: one seeded stream over the prompts, as the cached texts were drawn.
                if self.ranks.main:
                    if to_sample:
                        print(f"the base model writes its drift texts ({' and '.join(to_sample)}, "
                              f"{sum(len(PROMPTS[k]) for k in to_sample)} in all; once, then cached)", file=sys.stderr)
                    for kind in to_sample:
                        self.texts[kind] = kinds[kind](base, self.tokenizer, PROMPTS[kind], new_tokens=NEW_TOKENS,
                                                       seed=SAMPLING_SEED, autocast=self.autocast)
                        _write_json(texts_paths[kind], self.texts[kind])
                if to_encode:
                    self.texts = self.ranks.from_main(self.texts)
                for kind in to_encode:  # collective: the ranks share the batches
                    inputs = head_inputs(base, self.tokenizer, self.texts[kind], **self._drift_args(kind))
                    if self.ranks.main:
                        _save_tensors(self._inputs_path(kind, self.texts[kind]), inputs)
                    self.base_inputs[kind] = inputs
        for spec, score in fresh.items():
            if self.ranks.main:
                _write_json(paths[spec], to_dict(score))
            scores[spec] = score
        cached_inputs = {kind: torch.load(path, weights_only=True) for kind, path in inputs_paths.items()
                         if kind not in to_encode}
        scores, self.texts, cached_inputs = self.ranks.from_main((scores, self.texts, cached_inputs))
        self.base_inputs.update(cached_inputs)
        self.base = Evaluation(step=0, tasks={s: scores[s] for s in self.section.tasks},
                               targets={s: scores[s] for s in self.section.target_tasks})
        return self.base

    @preserved_rng()
    def evaluate(self, model, step: int | None) -> Evaluation:
        """Scores and drift of the model after `step` updates; appended to `curve` (and, by the main process, to the
        curve file)."""
        if self.base is None:
            raise RuntimeError("evaluate_base() must run first: the drift is measured on the base's texts")
        if self.ranks.main:
            print(f"measuring the {'tuned' if step is None else f'step-{step}'} model on "
                  f"{len(self.section.tasks) + len(self.section.target_tasks)} task(s), and its drift from the base",
                  file=sys.stderr)
        specs = self.section.tasks + self.section.target_tasks
        # Merged first: cast once, merged. A prefix shared by several batches (few-shot turns, a system turn) runs once.
        with adapter_merged(model), cast_once(self.autocast, model), prefix_sharing.kept_prefixes():
            scores = self._scores(model, {spec: load_tasks(spec) for spec in specs})
            drift, base = {}, None
            for kind, texts in self.texts.items():
                if self.base_inputs.get(kind) is not None:
                    drift[kind] = kl_drift(None, model, self.tokenizer, texts, **self._drift_args(kind),
                                           base_inputs=self.base_inputs[kind], base_head=self._base_head_for(model))
                else:  # a model whose logits the base's head inputs do not give: the base runs beside it
                    base = base or self._base_beside(model)
                    drift[kind] = kl_drift(base, model, self.tokenizer, texts, **self._drift_args(kind))
        point = Evaluation(step=step, tasks={s: scores[s] for s in self.section.tasks},
                           targets={s: scores[s] for s in self.section.target_tasks}, drift=drift)
        self.curve.append(point)
        if self.curve_file is not None:
            self.curve_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.curve_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(to_dict(without_logs(point))) + "\n")
        return point

    def _drift_args(self, kind: str) -> dict:
        # Chat texts are rendered by the template, special tokens included; raw texts get the tokenizer's own.
        return {"max_length": self.section.drift_max_length, "special_tokens": kind != "chat", "ranks": self.ranks,
                "autocast": self.autocast}

    def _inputs_path(self, kind: str, texts: list) -> Path:
        """Where the base's head inputs on these texts are cached: they depend on the texts, their batches and the
        precision, besides the weights."""
        digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest()
        return self._cache_path("drift", kind, "head inputs", digest, TOKENS_PER_PASS, LAYOUT,
                                self.section.drift_max_length, str(self.autocast)).with_suffix(".pt")

    def _base_head_for(self, tuned):
        """The base's output layer as a function: an adapter's base is the tuned model's own layer with the adapter
        off; a model trained whole gets the copy kept before training, or the base's, loaded once."""
        if _is_peft(tuned):
            from peft.tuners.tuners_utils import BaseTunerLayer
            from peft.utils import AuxiliaryTrainingWrapper

            layer = output_layer(tuned)
            if not isinstance(layer, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
                return layer  # the adapter leaves the output layer alone: it is the base's (switching peft off walks
                #               every module, twice per drift batch)

            def head(hidden):
                with tuned.disable_adapter():
                    return layer(hidden)
            return head
        if self._base_head is None:
            self._base_head = output_layer(self._load_base(next(tuned.parameters()).device))
        return self._base_head

    @property
    def served_apart(self) -> bool:
        """Whether the tasks are scored by vLLM from saved weights rather than by the model in memory."""
        return self.section.backend == "vllm"

    def _scores(self, model, loaded: dict) -> dict:
        """{spec: TaskScore} of `model` on the loaded tasks, by the recipe's backend; `model` None: the base (vLLM)."""
        if not self.served_apart:
            return evaluate_loaded(model, self.tokenizer, loaded, batch_size=self.section.batch_size,
                                   limit=self.section.limit, chat=self.section.apply_chat_template,
                                   share_prefixes=self.section.share_prefixes, ranks=self.ranks,
                                   autocast=self.autocast)
        if not loaded:
            return {}
        with vllm_backend.served(model, self.model_section, self.tokenizer) as args:
            lm = vllm_backend.make_lm(args, self.section.vllm_args)
            try:
                return evaluate_with(lm, loaded, limit=self.section.limit, chat=self.section.apply_chat_template)
            finally:
                del lm  # the last reference to vLLM's engine, so that release() can collect it
                vllm_backend.release()

    def _load_base(self, device: torch.device):
        return load_model(self.model_section, None).to(device)

    @contextmanager
    def _plain_base(self, model):
        """The base as a model lm-eval and generate() accept."""
        if model is None:
            yield self._load_base(eval_device())
        elif _is_peft(model):
            with model.disable_adapter():
                yield model
        else:
            yield model

    def _base_beside(self, tuned):
        """The base alive next to the tuned model, for the drift: the same weights with the adapter off, or a copy
        (freed when the caller lets go of it)."""
        if _is_peft(tuned):
            return AdapterDisabled(tuned)
        return self._load_base(next(tuned.parameters()).device)


def _save_tensors(path: Path, value) -> None:
    """torch.save aside, then renamed, as _write_json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(path.name + ".partial")
    torch.save(value, aside)
    aside.replace(path)


def without_logs(e: Evaluation) -> Evaluation:
    """The evaluation without lm-eval's per-example samples: a curve point kept small (the report saves the final
    model's in lm-eval's layout)."""
    def bare(scores):
        return {spec: dataclasses.replace(score, log={}) for spec, score in scores.items()}

    return dataclasses.replace(e, tasks=bare(e.tasks), targets=bare(e.targets))


def eval_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
