"""Tiny models and a tiny tokenizer, built here so every test runs offline in seconds."""

from __future__ import annotations

import json
import os
from pathlib import Path

from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from finetune.checkpoint import open_run_dir
from finetune.recipe import load_recipe
from finetune.train import train

# Models this small gain nothing from a second thread, and on a busy two-core machine a thread waiting for a core
# makes each step many times slower. Child processes (CLI and accelerate launch tests) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "the cat sat on the mat and the dog ran in the park",
    "what is the capital of france? paris is the capital of france.",
    "count: one two three four five six seven eight nine ten",
    "user assistant system question answer reply hello world",
    "abcdefghijklmnopqrstuvwxyz 0123456789 .,:;!?-+*/=()[]{}",
]

# One small config per architecture: what the tests train, the code never special-cases.
TINY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=512),
}


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    # No pad token on purpose: loading must add one, as for most base models.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def make_model_dir(root: Path, arch: str) -> Path:
    from transformers import AutoConfig

    tokenizer = make_tokenizer()
    kwargs = dict(TINY_CONFIGS[arch])
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False, **kwargs,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    out = root / f"tiny-{arch}"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """{arch: folder} for every tiny architecture, saved as Hugging Face folders (safetensors + tokenizer)."""
    root = tmp_path_factory.mktemp("models")
    return {arch: make_model_dir(root, arch) for arch in TINY_CONFIGS}


@pytest.fixture(scope="session")
def tiny_model(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_rows(n: int) -> list[dict]:
    """A memorisable chat task: the assistant counts on from a number."""
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    rows = []
    for i in range(n):
        start = i % 7
        rows.append({"messages": [
            {"role": "user", "content": f"count from {words[start]}"},
            {"role": "assistant", "content": " ".join(words[start:start + 4])},
        ]})
    return rows


def write_recipe(path: Path, recipe: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def make_recipe(tmp_path, model_dir, name="r", rows=32, **sections):
    data = tmp_path / "chat.jsonl"
    if not data.exists():
        write_jsonl(data, chat_rows(rows))
    recipe = {
        "model": {"path": str(model_dir)},
        "data": {"train": [{"path": str(data), "format": "chat"}], "max_length": 64},
        "train": {"lr": 3e-3, "max_steps": 4, "batch_size": 4, "seed": 0},
        "output": {"dir": str(tmp_path / "runs" / name), "save_every": 0},
    }
    for section, values in sections.items():
        if values is None:
            recipe[section] = None
        else:
            recipe.setdefault(section, {}).update(values)
    return write_recipe(tmp_path / f"{name}.yaml", recipe)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir):
    final = run_dir / "final"
    name = "adapter_model.safetensors" if (final / "adapter_config.json").exists() else "model.safetensors"
    return load_file(final / name)


def assert_close(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; accelerate keeps process-wide singletons."""
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run(path, *overrides, accept_changes=False):
    recipe = load_recipe(path, list(overrides))
    model = train(recipe, open_run_dir(recipe, accept_changes))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Path(recipe.output.dir), model
