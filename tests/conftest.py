"""Shared fixtures and helpers: tiny models and a tiny tokenizer (every test runs offline in seconds), data with
varied target counts, recipes and runs, the forgetting set-up (a base pre-trained on an lm-eval task), and
`accelerate launch` without a port to collide on. Test modules import helpers from here, never from each other."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

import pytest
import torch
from hypothesis import settings
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from finetune.checkpoint import open_run_dir
from finetune.model_files import load_tokenizer
from finetune.recipe import ModelSection, load_recipe
from finetune.train import train

# Models this small gain nothing from a second thread, and on a busy two-core machine a thread waiting for a core
# makes each step many times slower. Child processes (CLI and accelerate launch tests) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# The property tests draw the same examples on every run, so the suite passes or fails the same way each time.
# HYPOTHESIS_PROFILE=explore searches afresh (and a failure it finds becomes an @example).
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

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
    # Learned absolute positions: the one family where position ids that fail to restart per packed example show.
    # Dropout off, as in the others, so that equivalence tests can compare exactly.
    "gpt2": dict(model_type="gpt2", n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=512,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
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


WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _counts(i: int) -> tuple[int, int]:
    """(first word, number of words) of row i: 1 to 8 words, 24 distinct rows. Answers of different lengths give
    packed rows, micro-batches and ranks different target counts, so a loss normalised per micro-batch or per rank
    instead of over the global batch shows."""
    return i % 3, 1 + (i * 5) % 8


def chat_rows(n: int) -> list[dict]:
    """A memorisable chat task: the assistant counts on from a word, as many words as asked (1 to 8)."""
    rows = []
    for i in range(n):
        start, length = _counts(i)
        rows.append({"messages": [
            {"role": "user", "content": f"count {length} from {WORDS[start]}"},
            {"role": "assistant", "content": " ".join(WORDS[start:start + length])},
        ]})
    return rows


def text_rows(n: int) -> list[dict]:
    """Format `text` (every token a target, the first included): counts of 1 to 8 words."""
    rows = []
    for i in range(n):
        start, length = _counts(i)
        rows.append({"text": "count: " + " ".join(WORDS[start:start + length])})
    return rows


def write_recipe(path: Path, recipe: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def make_recipe(tmp_path, model_dir, name="r", rows=32, fmt="chat", **sections):
    """A recipe file for a short run on `rows` rows of chat_rows (fmt "chat") or text_rows (fmt "text")."""
    data = tmp_path / f"{fmt}.jsonl"
    if not data.exists():
        write_jsonl(data, chat_rows(rows) if fmt == "chat" else text_rows(rows))
    recipe = {
        # The test's own cache: the default, ~/.cache/finetune, is the user's (base evaluations were written there).
        "model": {"path": str(model_dir), "cache_dir": str(tmp_path / "cache")},
        "data": {"train": [{"path": str(data), "format": fmt}], "max_length": 64},
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


# ---------------------------------------------------------------- forgetting: a base that knows an lm-eval task

ITEMS = list("abcdefghijklmnop")  # 16 questions
ANSWERS = ["one", "two", "three", "four"]


def task_rows(shift: int) -> list[dict]:
    """"Q: what is x? A: <word>": the original task (shift 0) and a conflicting one (another word, same prompt)."""
    return [{"item": x, "label": (i + shift) % len(ANSWERS)} for i, x in enumerate(ITEMS)]


def write_task(folder: Path, name: str, shift: int) -> Path:
    """A local lm-eval multiple-choice task: a YAML file and its jsonl data."""
    folder.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(folder / f"{name}.jsonl", task_rows(shift))
    path = folder / f"{name}.yaml"
    path.write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: what is {{{{item}}}}? A:"
doc_to_choice: {json.dumps(ANSWERS)}
doc_to_target: label
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
""", encoding="utf-8")
    return path


def texts(shift: int) -> list[str]:
    return [f"Q: what is {r['item']}? A: {ANSWERS[r['label']]}" for r in task_rows(shift)]


def fit(model, tokenizer, lines: list[str], *, lr: float, steps: int) -> None:
    """Full-batch AdamW on every token of `lines`: enough to memorise 16 short lines in a few hundred steps."""
    batch = tokenizer(lines, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture(scope="session")
def tasks(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tasks")
    return {"original": write_task(folder, "original", 0), "conflict": write_task(folder, "conflict", 1)}


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    """A tiny llama pre-trained on the original task: the base whose knowledge fine-tuning may destroy."""
    root = tmp_path_factory.mktemp("base")
    folder = make_model_dir(root, "llama")
    tokenizer = load_tokenizer(ModelSection(path=str(folder)))
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(0)
    fit(model, tokenizer, texts(0), lr=3e-3, steps=150)
    model.save_pretrained(folder)
    return folder


def write_generation_task(folder: Path) -> Path:
    """The original task answered by generation: greedy, the first word of the reply scored by exact match."""
    folder.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(folder / "gen.jsonl", [{"item": r["item"], "answer": ANSWERS[r["label"]]} for r in task_rows(0)])
    path = folder / "gen.yaml"
    path.write_text(f"""task: gen
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: generate_until
doc_to_text: "Q: what is {{{{item}}}}? A:"
doc_to_target: answer
generation_kwargs: {{until: ["\\n", "Q:"], max_gen_toks: 6, do_sample: false}}
filter_list:
  - name: first_word
    filter:
      - {{function: regex, regex_pattern: "[a-z]+", group_select: 0, fallback: "[no answer]"}}
      - {{function: take_first}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true}}
""", encoding="utf-8")
    return path


def conflicting_recipe(tmp_path, base_dir, tasks, **eval_section):
    data = write_jsonl(tmp_path / "conflict.jsonl", [{"text": t} for t in texts(1)])
    return make_recipe(
        tmp_path, base_dir, model={"cache_dir": str(tmp_path / "cache")},
        data={"train": [{"path": str(data), "format": "text"}], "packing": False},
        # Every probe of the default schedule (2, 4, 8, 16), whatever it costs: tests of forecasts need them all.
        train={"max_steps": 20, "lr": 3e-3, "batch_size": 8, "probe_budget": None},
        eval={"tasks": [str(tasks["original"])], "target_tasks": [str(tasks["conflict"])], **eval_section},
    )



def calibration(path, delta: float, spread: float = 0.005, runs: int = 20, later: tuple[int, ...] = ()):
    """A calibration file of `runs` earlier runs of 20 updates whose task `original` changed by `delta` give or take
    `spread`, whatever their probes (20: the fewest whose draws bound a 90% interval at both ends is 19), probed
    after updates 1, 2 and `later`."""
    rows = []
    for i in range(runs):
        probes = {"1": {"probe_kl_general": 0.01, "probe_kl_task": 0.1},
                  **{str(s): {"probe_kl_general": 0.01 * s * (1 + i), "probe_kl_task": 0.15 * s * (1 + (i * 3) % 5)}
                     for s in (2, *later)}}
        rows.append({"run": f"r{i}", "max_steps": 20, "reproduced": True, "probes": probes, "max_drop": 0.05,
                     "verdict": "FAIL", "tasks": {"original": {"delta": delta + spread * ((i * 7) % 3 - 1), "n": 16}}})
    return write_jsonl(path, rows)


# ---------------------------------------------------------------- several processes

ROOT = Path(__file__).resolve().parents[1]

# `accelerate launch ARGS` with torchrun's standalone rendezvous. accelerate reaches it only as a fallback when its
# port is taken, and turns `--main_process_port 0` into a port it binds, closes and hands on, which another launch
# may take in between. Standalone, the rendezvous store binds port 0 itself and keeps it, and the ranks' process
# group reuses that store (torch shares it with the workers), so no port number exists before it is bound.
def accelerate_launch(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `accelerate launch ARGS` (e.g. --config_file, the script and its arguments) from the repository root on
    this machine (one node), with no port to collide on, whatever other launches run at the same time. A launch that
    hangs is killed with all its ranks after `timeout` seconds and fails the test with its output."""
    from multiproc import finish, launch

    return finish(launch(*args), timeout)


def ddp_launch(config: str, recipe: Path, *overrides: str, num_processes: int | None = None) -> subprocess.CompletedProcess:
    """`finetune train RECIPE OVERRIDES` through tests/dist_worker.py under launch/CONFIG."""
    args = ["--config_file", str(ROOT / "launch" / config)] + (["--num_processes", str(num_processes)] if num_processes else [])
    return accelerate_launch(*args, str(ROOT / "tests" / "dist_worker.py"), str(recipe), *overrides)


def original_drop(run_dir) -> float:
    """How much a run lost on the task named `original` (conflicting_recipe's), from its report."""
    report = json.loads((run_dir / "forgetting" / "report.json").read_text())
    return -report["tasks"]["original"]["delta"]


@pytest.fixture(scope="session")
def tied_llama(tmp_path_factory) -> Path:
    """A tiny Llama whose output head is its input embedding (as SmolLM2's): one weight, saved once."""
    tokenizer = make_tokenizer()
    kwargs = dict(TINY_CONFIGS["llama"])
    config = AutoConfig.for_model(kwargs.pop("model_type"), vocab_size=len(tokenizer), tie_word_embeddings=True,
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    out = tmp_path_factory.mktemp("tied") / "tiny-llama-tied"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    return out
