"""Where a recipe's model is (a folder, a hub id, a GGUF file's converted folder) and its tokenizer.

No model code is imported here (transformers' modeling, peft, finetune's attention): the checks before a run and
`finetune check` load the tokenizer through this module in a few seconds rather than a model's imports.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock
from transformers import AutoTokenizer

from .errors import UserError
from .recipe import ModelSection


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
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    from . import quiet

    quiet.silence_gguf_conversion()

    # Dequantized, the model is a plain one: transformers drops its quantization marker, so it can be saved
    # (a quantized GGUF model refuses save_pretrained) and the saved config reloads without the GGUF file.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    write_aside(target, write)


def write_aside(final: Path, write: Callable[[Path], None]) -> None:
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
