"""The commands users of other toolkits expect (--version, env, preview, check --print, recipes, chat), what a run
shows while it trains and when it ends, and final/ as a portable, described folder."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from conftest import make_recipe, run, write_jsonl

from finetune import __version__
from finetune.cli import main as cli_main
from finetune.progress import TrainingDisplay
from finetune.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def finetune(*args, cwd: Path, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", **env}
    return subprocess.run([sys.executable, "-m", "finetune", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env=env)


def test_version_and_env(capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"finetune {__version__}"
    assert cli_main(["env"]) == 0
    out = capsys.readouterr().out
    import torch
    import transformers

    assert f"torch            {torch.__version__}" in out and f"transformers     {transformers.__version__}" in out
    assert "accelerators:" in out and "accelerate default config:" in out and "lock:" in out


def test_env_names_each_installed_version_that_differs_from_the_lock(tmp_path):
    from importlib.metadata import version

    from finetune.env import lock_status

    lock = tmp_path / "requirements.lock"
    lock.write_text(f"PyYAML=={version('pyyaml')} \\\n    --hash=sha256:00\n    # via finetune (pyproject.toml)\n"
                    "accelerate==0.0.1 \\\n    --hash=sha256:00\nno_such.package==1.0 ; python_version >= '3'\n"
                    "# torch\n")
    assert lock_status(lock) == [f"{lock}: 2 of its 3 packages differ (`bash scripts/install.sh` restores it):",
                                 f"  accelerate {version('accelerate')} (lock: 0.0.1)",
                                 "  no-such-package not installed (lock: 1.0)"]
    lock.write_text(f"pyyaml=={version('pyyaml')}\n")
    assert lock_status(lock) == [f"{lock}: every one of its 1 packages installed at its version"]
    assert lock_status(tmp_path / "none.lock")[0].startswith("no none.lock beside this install")


def test_every_command_is_in_help_and_the_readme():
    from finetune.cli import COMMANDS, _parser

    helptext = _parser().format_help()
    readme = (ROOT / "README.md").read_text()
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s", helptext, re.M), command
        assert f"finetune {command}" in readme, command
    assert "--version" in helptext and "--verbose" in helptext


def test_check_print_writes_the_resolved_recipe_that_loads_back_the_same(tmp_path, tiny_model, capsys):
    path = make_recipe(tmp_path, tiny_model, lora={"r": 4})
    assert cli_main(["check", str(path), "--print", "train.lr=0.01"]) == 0
    printed = capsys.readouterr().out
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(printed)
    again, original = load_recipe(resolved), load_recipe(path, ["train.lr=0.01"])
    assert again == original and again.train.warmup_steps == 0 and again.lora.alpha == 32.0  # defaults filled in


def test_preview_marks_exactly_the_trained_tokens_and_reports_packing(tmp_path, tiny_model, capsys):
    rows = [{"messages": [{"role": "user", "content": "count from one"},
                          {"role": "assistant", "content": "one two three"}]}] * 6
    write_jsonl(tmp_path / "chat.jsonl", rows)
    path = make_recipe(tmp_path, tiny_model)
    assert cli_main(["preview", str(path), "--rows", "1"]) == 0
    out = capsys.readouterr().out
    # Only the assistant's reply and its end-of-turn token are trained; the prompt is shown but not marked.
    example = out.split("--- example 0")[1].split("packing:")[0]
    assert re.findall(r"\[\[(.*?)\]\]", example, re.S) == ["one two three<|im_end|>\n"]
    assert "count from one" in example
    recipe = load_recipe(path)
    from finetune.data import RowDataset, build_datasets
    from finetune.model_files import load_tokenizer

    train, _, stats = build_datasets(recipe.data, load_tokenizer(recipe.model), 0)
    packed = RowDataset(train, recipe.data.max_length, True)
    assert f"rows       {len(packed)} of 64 tokens" in out and f"examples   {stats.examples}" in out


def test_recipes_lists_and_copies_a_recipe_that_runs_where_it_was_copied(tmp_path, capsys):
    assert cli_main(["recipes"]) == 0
    listed = capsys.readouterr().out
    for name in ("tiny-lora", "demo-lora", "cpu_ddp", "general_knowledge", "zorblax"):
        assert name in listed
    dest = tmp_path / "mine"
    assert cli_main(["recipes", "copy", "tiny-lora", str(dest)]) == 0
    assert (dest / "recipes" / "tiny-lora.yaml").is_file() and (dest / "data" / "tiny-llama" / "config.json").is_file()
    proc = finetune("check", "recipes/tiny-lora.yaml", cwd=dest)  # the README's command, from where it was copied
    assert proc.returncode == 0, proc.stderr
    assert cli_main(["recipes", "copy", "tiny-lora", str(dest)]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["recipes", "copy", "zorblax", str(dest)]) == 0  # a task suite, with the template it includes
    assert (dest / "data" / "tasks" / "_local_jsonl_template_yaml").is_file()


def test_every_shipped_file_is_package_data_in_the_wheel():
    """pyproject maps recipes/, launch/ and data/ into the package (finetune/shipped/); every file `finetune recipes`
    lists or copies must match a package-data pattern, or a pip install would lack it."""
    from fnmatch import fnmatch

    from finetune import shipped

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = []
    for package, folder in config["package-dir"].items():
        for sub in [p for p in config["packages"] if p == package or p.startswith(package + ".")]:
            where = folder + sub[len(package):].replace(".", "/")
            patterns += [f"{where}/{g}" for g in config["package-data"].get(sub, [])]
    needed = set()
    for _, _, path, _ in shipped.catalogue():
        relative = str(path.relative_to(ROOT))
        needed.add(relative)
        for item in shipped._needs(relative):
            src = ROOT / item
            needed |= {str(p.relative_to(ROOT)) for p in (src.rglob("*") if src.is_dir() else [src]) if p.is_file()
                       and "__pycache__" not in p.parts}
    missing = sorted(n for n in needed if not any(fnmatch(n, p) for p in patterns))
    assert not missing and len(needed) > 20


def _memorised_run(tmp_path, tiny_model, name, **sections):
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "count from one"},
                                                        {"role": "assistant", "content": "one two three four"}]}] * 16)
    return run(make_recipe(tmp_path, tiny_model, name, **sections))


def test_chat_reads_turns_from_stdin_and_answers_in_the_chat_template(tmp_path, tiny_model, capsys, monkeypatch):
    run_dir, _ = _memorised_run(tmp_path, tiny_model, "full", train={"max_steps": 30, "lr": 1e-2})
    monkeypatch.setattr(sys, "stdin", io.StringIO("count from one\n/reset\ncount from one\n"))
    capsys.readouterr()
    assert cli_main(["chat", str(run_dir), "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.splitlines() == ["one two three four"] * 2


def test_chat_loads_an_adapter_on_its_base(tmp_path, tiny_model):
    import torch

    from finetune.chat import load

    run_dir, trained = _memorised_run(tmp_path, tiny_model, "lora", lora={"r": 4})
    model, tokenizer, what = load(run_dir, None)
    assert "LoRA adapter" in what
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, trained.eval()(input_ids=ids).logits, atol=1e-6)


def test_chat_on_a_run_folder_needs_its_model_not_its_data_and_takes_the_base_it_was_trained_from(
        tmp_path, tiny_model, monkeypatch):
    import torch

    from finetune.chat import load

    shutil.copytree(tiny_model, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    run_dir, trained = _memorised_run(tmp_path, tiny_model, "lora", lora={"r": 4}, model={"path": "base"})
    (tmp_path / "chat.jsonl").unlink()  # the training data has moved on since
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # `base`, relative in recipe.yaml, is not here; finetune.json's path is
    model, _, what = load(run_dir, None)
    assert "LoRA adapter" in what
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, trained.eval()(input_ids=ids).logits, atol=1e-6)


# ---------------------------------------------------------------- what a run shows


def test_plain_lines_when_stderr_is_not_a_terminal_with_smoothed_rate_lr_and_validation_loss():
    stream = io.StringIO()
    display = TrainingDisplay(True, total=40, initial=0, stream=stream)
    for step in range(1, 41):
        # One window holds a checkpoint pause: its rate is 1000 times lower and must not become the shown rate.
        display.record({"step": step, "loss": 1.0 / step, "lr": 1e-3, "tokens_per_s": 1.0 if step == 20 else 1000.0,
                        **({"val_loss": 0.5} if step == 20 else {})})
        display.step()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 20  # one line per 5% of the run
    assert lines[-1].startswith("step 40/40") and "lr 1.00e-03" in lines[-1] and "1,000 tok/s" in lines[-1]
    assert "val 0.5000" in lines[-1] and all(", 1,000 tok/s" in line for line in lines)


@pytest.mark.slow
def test_a_normal_run_shows_no_library_noise_and_ends_with_a_summary(tmp_path, tiny_model):
    """In a folder that is not a git repository, with a task suite lm-eval loads through a custom loader: the noise
    the libraries print (shown with --verbose) stays out of a normal run."""
    shutil.copytree(ROOT / "data" / "tasks", tmp_path / "tasks")
    drift = tmp_path / "drift.txt"
    drift.write_text("the cat sat on the mat\nwhat is the capital of france?\n")
    path = make_recipe(tmp_path, tiny_model, lora={"r": 4}, model={"name": "someorg/tiny"},
                       data={"val_fraction": 0.25},
                       eval={"tasks": [str(tmp_path / "tasks" / "general_knowledge.yaml")], "limit": 4,
                             "drift_texts": [str(drift)]})
    noise = ("Loading weights", "Generating train split", "Custom kwargs can be passed", "fatal: not a git",
             "FutureWarning", "Tokenizing inputs", "Writing model shards", "Setting accelerator to CPU")
    # Each with a datasets cache of its own: a dataset read before is not "generated" again.
    verbose = finetune("--verbose", "train", path, "output.dir=runs/verbose", cwd=tmp_path,
                       HF_DATASETS_CACHE=str(tmp_path / "datasets-verbose"))
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert all(n in verbose.stderr + verbose.stdout for n in (
        "Loading weights", "Generating train split", "Custom kwargs can be passed", "fatal: not a git",
        "Tokenizing inputs", "Setting accelerator to CPU"))  # the last: DeepSpeed, installed for its tests
    quiet = finetune("train", path, cwd=tmp_path, HF_DATASETS_CACHE=str(tmp_path / "datasets-quiet"))
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert not [n for n in noise if n in quiet.stderr + quiet.stdout], quiet.stderr
    assert "\r" not in quiet.stderr and re.search(r"^step 4/4 \(.*\): loss .*, lr .*, .* tok/s, val ", quiet.stderr,
                                                  re.M)
    run_dir = tmp_path / "runs" / "r"
    assert "done: 4 updates in" in quiet.stdout and f"report:  {run_dir / 'forgetting' / 'report.html'}" in quiet.stdout
    # Where the time went: the parts add up to the run's time, the base's evaluation within the evaluation's.
    clock = r"(\d+):(\d\d)"
    total = re.search(rf"done: 4 updates in {clock}", quiet.stdout).groups()
    parts = re.search(rf"time: +updates {clock} \(of which the probes {clock}, train.probe_every\); forgetting "
                      rf"evaluation {clock}, of which the base model {clock}; loading, data and saving {clock}",
                      quiet.stdout)
    assert parts, quiet.stdout
    seconds = [int(m) * 60 + int(s) for m, s in zip(*[iter((*total, *parts.groups()))] * 2)]
    run_time, updates, probes, evaluation, base, rest = seconds
    assert abs(updates + evaluation + rest - run_time) <= 2 and base <= evaluation and probes <= updates


@pytest.mark.parametrize("verbose", [True, False])
def test_saving_a_tied_embedding_model_says_nothing_unless_verbose(verbose):
    # accelerate's save_state of a full fine-tune of a tied model (the demo's SmolLM2) warns on every checkpoint.
    code = ("from finetune import quiet; quiet.configure(%s); quiet.libraries()\n"
            "import torch; from accelerate import PartialState; PartialState(cpu=True)\n"
            "from accelerate.utils.other import clean_state_dict_for_safetensors as clean\n"
            "t = torch.zeros(2); assert list(clean({'a': t, 'b': t})) == ['a']" % verbose)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert ("Removed shared tensor {'b'}" in done.stderr) == verbose, done.stderr


@pytest.mark.slow
def test_final_names_its_hub_base_keeps_the_local_path_and_carries_a_model_card(tmp_path, tiny_model, capsys):
    shutil.copytree(ROOT / "data" / "tasks", tmp_path / "tasks")
    drift = tmp_path / "drift.txt"
    drift.write_text("the cat sat on the mat\nwhat is the capital of france?\n")
    run_dir, _ = run(make_recipe(tmp_path, tiny_model, lora={"r": 4}, model={"name": "someorg/tiny"},
                                 eval={"tasks": [str(tmp_path / "tasks" / "general_knowledge.yaml")], "limit": 4,
                                       "drift_texts": [str(drift)]}))
    final = run_dir / "final"
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == "someorg/tiny"
    assert json.loads((final / "finetune.json").read_text())["base_model_path"] == str(tiny_model.absolute())
    card = (final / "README.md").read_text()
    verdict = json.loads((run_dir / "forgetting" / "report.json").read_text())["verdict"]["text"]
    assert card.startswith("---\nbase_model: someorg/tiny\nlibrary_name: peft\n")
    assert f"**{verdict}**" in card and "general_knowledge" in card and "chat.jsonl" in card
    assert "LoRA adapter (r 4" in card and yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])["lora"]["r"] == 4
    # someorg/tiny is on no hub: merge finds the base through the local path kept in finetune.json.
    assert cli_main(["merge", str(run_dir), str(tmp_path / "merged")]) == 0


def test_a_gguf_file_names_the_hub_repository_it_records(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    from finetune.card import base_name
    from finetune.recipe import ModelSection

    path = tmp_path / "m.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_string("general.source.huggingface.repository", "someorg/some-model")
    writer.add_tensor("t", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert base_name(ModelSection(path=str(path))) == "someorg/some-model"
    assert base_name(ModelSection(path=str(path), name="other/name")) == "other/name"
    assert base_name(ModelSection(path="org/hub-model")) == "org/hub-model"


@pytest.mark.slow
def test_the_model_card_takes_the_verdict_of_a_later_finetune_eval(tmp_path, tiny_model):
    shutil.copytree(ROOT / "data" / "tasks", tmp_path / "tasks")
    run_dir, _ = run(make_recipe(tmp_path, tiny_model, lora={"r": 4}))
    card = run_dir / "final" / "README.md"
    assert "No forgetting report" in card.read_text()
    saved = {p.name: p.stat().st_ino for p in (run_dir / "final").iterdir() if p != card}
    assert cli_main(["eval", str(tiny_model), str(run_dir), "--tasks", str(tmp_path / "tasks" / "general_knowledge.yaml"),
                     "--limit", "4"]) == 0
    verdict = json.loads((run_dir / "forgetting" / "report.json").read_text())["verdict"]["text"]
    assert f"**{verdict}**" in card.read_text() and "No forgetting report" not in card.read_text()
    # Only the card is rewritten: final/ stays as training saved it (a GGUF base is not resolved again).
    assert {p.name: p.stat().st_ino for p in (run_dir / "final").iterdir() if p != card} == saved


def test_chat_names_the_system_prompt_a_dataset_was_trained_under(tmp_path):
    from finetune.chat import trained_system_prompts

    (tmp_path / "recipe.yaml").write_text("data:\n  train:\n    - {path: a.jsonl, format: chat, system: Sort words.}\n"
                                          "    - {path: b.jsonl, format: chat}\n", encoding="utf-8")
    assert trained_system_prompts(tmp_path) == {"a.jsonl": "Sort words."}
    (tmp_path / "recipe.yaml").write_text("data:\n  train: [{path: b.jsonl, format: chat}]\n", encoding="utf-8")
    assert trained_system_prompts(tmp_path) == {} and trained_system_prompts(tmp_path / "missing") == {}


def test_the_gguf_conversion_bar_is_off_unless_verbose(monkeypatch, capsys):
    """transformers' GGUF loader draws its "Converting and de-quantizing GGUF tensors" bar with the `tqdm` of its
    own module, looked up at call time and outside transformers' progress-bar switch; finetune says once that it
    converts, so a quiet CLI turns that bar off."""
    import inspect

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from finetune import quiet

    assert "tqdm(reader.tensors" in inspect.getsource(gguf_utils), "transformers changed how the GGUF bar is drawn"
    monkeypatch.setattr(gguf_utils, "tqdm", gguf_utils.tqdm)  # restored after the test
    for verbose in (True, False):
        monkeypatch.setattr(quiet, "_quiet", False)
        quiet.configure(verbose)
        quiet.silence_gguf_conversion()
        list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
        assert ("Converting and de-quantizing" in capsys.readouterr().err) == verbose


@pytest.mark.slow
def test_finetune_eval_measures_in_the_precision_asked_and_the_base_again_in_it(tmp_path, tiny_model):
    """`finetune eval --mixed-precision`: the report says which precision scored it, and the base's cached scores
    of the other precision are not reused (a bf16 base against a float32 tuned model would mix the two)."""
    shutil.copytree(ROOT / "data" / "tasks", tmp_path / "tasks")
    run_dir, _ = run(make_recipe(tmp_path, tiny_model, lora={"r": 4}))
    task = str(tmp_path / "tasks" / "general_knowledge.yaml")
    cache = tmp_path / "cache" / "base_eval"
    seen = {}
    for setting in ("no", "bf16"):
        out = tmp_path / f"report-{setting}"
        assert cli_main(["eval", str(tiny_model), str(run_dir), "--tasks", task, "--limit", "4",
                         "--mixed-precision", setting, "--out", str(out)]) == 0
        seen[setting] = json.loads((out / "report.json").read_text())["provenance"]["evaluation"]
        assert len(list(cache.glob("*.json"))) == 1 + (setting == "bf16")
        # The drift texts too: the base draws them in the evaluation's precision (text and chat kinds).
        assert len(list((tmp_path / "cache" / "drift").glob("*.json"))) == 2 * (1 + (setting == "bf16"))
    assert seen["no"].startswith("no autocast") and seen["bf16"].startswith("bf16 autocast"), seen
