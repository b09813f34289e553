"""`eval.backend: vllm`: the tasks are scored by lm-eval's own `vllm` model (lm_eval.models.vllm_causallms.VLLM), as
users of 7-70B models evaluate on GPUs, rather than by a backend of finetune's. lm-eval's output is the same either
way, so the per-example scores feed the same paired statistics.

vLLM loads a model from disk, not from memory: the base is served from its folder (model.path, a GGUF file's
converted folder); a tuned LoRA model as that folder plus its adapter, saved aside (vLLM applies it: lm-eval's
`lora_local_path`); a fully tuned model saved aside whole. The drift stays finetune's own: it needs both models'
whole next-token distributions on the same texts, and vLLM returns only the top few log-probabilities.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..recipe import ModelSection

# What vLLM may take of the GPU memory that is free when it starts (its own default, 0.9 of the whole GPU, fails
# beside a model being trained).
FREE_MEMORY_SHARE = 0.85


def lm_class():
    """lm-eval's vLLM model class, from its registry (so that lm-eval decides what "vllm" is)."""
    from lm_eval.api.registry import get_model

    return get_model("vllm")


@contextmanager
def served(model, base: ModelSection, tokenizer) -> Iterator[dict]:
    """lm-eval model arguments that make vLLM load `model`: None for the base itself, a peft model (its adapter saved
    aside, over the base's folder), or a whole model (saved aside). The tokenizer goes with it, saved aside: its
    chat template is the one the run uses (data.chat_template included)."""
    import peft

    from ..model import resolve_model_path

    with tempfile.TemporaryDirectory(prefix="finetune-vllm-") as tmp:
        tokenizer.save_pretrained(Path(tmp) / "tokenizer")
        args = {"tokenizer": str(Path(tmp) / "tokenizer"), "trust_remote_code": base.trust_remote_code}
        weights = Path(tmp) / "model"
        if model is None or isinstance(model, peft.PeftModel):
            args.update(pretrained=resolve_model_path(base), **({"revision": base.revision} if base.revision else {}))
        if isinstance(model, peft.PeftModel):
            model.save_pretrained(weights)
            config = model.peft_config[model.active_adapter]
            args.update(lora_local_path=str(weights), max_lora_rank=_lora_rank(config))
        elif model is not None:
            model.save_pretrained(weights, safe_serialization=True)
            args.update(pretrained=str(weights))
        yield args


def _lora_rank(config) -> int:
    """The largest rank of the adapter (vLLM sizes its LoRA buffers by it), rounded up to one vLLM accepts."""
    rank = max([config.r, *(config.rank_pattern or {}).values()])
    return next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), rank)


def memory_share() -> float:
    """The share of the whole GPU vLLM may take: most of what is free now."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return round(FREE_MEMORY_SHARE * free / total, 3)


def make_lm(model_args: dict, extra: dict):
    """lm-eval's vLLM model for `model_args` (from `served`), with the recipe's `eval.vllm_args` over finetune's
    defaults: batches sized by vLLM, the memory that is free, the model's dtype."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its start-up chatter is no news to a finetune user
    defaults = {"batch_size": "auto", "dtype": "auto"}
    if "gpu_memory_utilization" not in extra:
        defaults["gpu_memory_utilization"] = memory_share()
    return lm_class()(**{**defaults, **model_args, **extra})


def release() -> None:
    """Collects what the caller let go of (vLLM's engine) and empties torch's cache before training or the drift go
    on. Whether vLLM then frees all the memory it took has not been checked on a GPU."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
