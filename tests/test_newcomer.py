"""A newcomer's slips, each answered by one clear line and a non-zero exit, without a traceback.

Commands run as a user runs them (`python -m finetune ...` in a folder of their own), with the hub pointed at a
closed local port and an empty cache: nothing here uses the network, and the outcome is the same with or without it.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from conftest import make_recipe, metrics, run, weights, write_jsonl, write_recipe
from multiproc import free_port

from finetune.checkpoint import RunDir
from finetune.checkpoint import write_recipe as write_run_recipe
from finetune.cli import main as cli_main
from finetune.recipe import describe_changes, load_recipe

ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: connections are refused at once


def finetune(*args, cwd: Path, hub_cache: Path | None = None, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    environ.update(HF_ENDPOINT=UNREACHABLE, **env)
    if hub_cache is not None:
        environ["HF_HUB_CACHE"] = str(hub_cache)
    return subprocess.run([sys.executable, "-m", "finetune", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env=environ)


def one_error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The run failed with exit code 2 and said so in one line with `error:`, with no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-4000:]
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


@pytest.fixture
def workdir(tmp_path, tiny_model):
    """A user's folder: a local model and a chat dataset, named by relative paths."""
    (tmp_path / "data").mkdir()
    shutil.copytree(tiny_model, tmp_path / "data" / "tiny-llama")
    shutil.copyfile(ROOT / "data" / "tiny-chat.jsonl", tmp_path / "data" / "chat.jsonl")
    write_recipe(tmp_path / "r.yaml", {
        "model": {"path": "data/tiny-llama"},
        "data": {"train": [{"path": "data/chat.jsonl", "format": "chat"}], "max_length": 64},
        "train": {"max_steps": 2, "batch_size": 4},
        "lora": {"r": 4},
        "output": {"dir": "runs/r", "save_every": 0},
    })
    return tmp_path


# ---------------------------------------------------------------- the hub, unreachable


@pytest.mark.slow
def test_unreachable_hub_model_is_refused_at_once_naming_the_id_and_the_ways_out(workdir):
    proc = finetune("train", "r.yaml", "model.path=HuggingFaceTB/SmolLM2-135M", cwd=workdir,
                    hub_cache=workdir / "empty-cache")
    one_error_line(proc, "HuggingFaceTB/SmolLM2-135M", "model.path", "local folder", "HF_HUB_OFFLINE=1", "cache")
    assert "Retrying" not in proc.stderr
    assert not (workdir / "runs" / "r").exists()  # refused before anything was written


def test_offline_mode_without_the_model_cached_says_so(workdir):
    proc = finetune("check", "r.yaml", "model.path=HuggingFaceTB/SmolLM2-135M", cwd=workdir,
                    hub_cache=workdir / "empty-cache", HF_HUB_OFFLINE="1")
    one_error_line(proc, "HuggingFaceTB/SmolLM2-135M", "not in the local cache", "HF_HUB_OFFLINE")


def test_unreachable_hub_dataset_is_refused_naming_its_key(workdir):
    proc = finetune("check", "r.yaml", "data.train=[{path: someorg/somedata, format: text}]", cwd=workdir,
                    hub_cache=workdir / "empty-cache")
    one_error_line(proc, "someorg/somedata", "data.train[0].path", "cannot reach")


def _fake_hub_cache(root: Path, repo: str, model_dir: Path) -> Path:
    """The layout huggingface_hub keeps a downloaded model in: refs/main names a snapshot folder."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / "abc"
    shutil.copytree(model_dir, snapshot)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("abc")
    return snapshot


@pytest.mark.slow
def test_unreachable_hub_with_the_model_cached_trains_offline_and_names_the_hub_id_in_the_adapter(workdir):
    cache = workdir / "hub-cache"
    _fake_hub_cache(cache, "someorg/tiny-llama", workdir / "data" / "tiny-llama")
    proc = finetune("train", "r.yaml", "model.path=someorg/tiny-llama", cwd=workdir, hub_cache=cache)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "cannot be reached" in proc.stderr and "cached copy of someorg/tiny-llama" in proc.stderr
    config = json.loads((workdir / "runs" / "r" / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "someorg/tiny-llama"  # portable: the hub id, not a cache path


@pytest.mark.slow
def test_eval_of_an_lm_eval_task_offline_is_one_line_naming_its_dataset(workdir):
    model = workdir / "data" / "tiny-llama"
    proc = finetune("eval", model, model, "--tasks", "hellaswag", "--limit", "2", cwd=workdir,
                    hub_cache=workdir / "empty-cache", HF_DATASETS_CACHE=str(workdir / "empty-datasets"))
    one_error_line(proc, "hellaswag", "HF_HUB_OFFLINE=1")
    assert "Retrying" not in proc.stderr


# ---------------------------------------------------------------- paths


def test_a_mistyped_local_model_path_is_not_found_not_a_hub_lookup(workdir):
    for command in ("check", "train"):
        proc = finetune(command, "r.yaml", "model.path=data/tiny-lama", cwd=workdir, hub_cache=workdir / "c")
        one_error_line(proc, "data/tiny-lama", "does not exist", "did you mean data/tiny-llama")


def test_output_dir_that_is_a_file_is_refused_by_check_and_train(workdir):
    (workdir / "notes.txt").write_text("mine")
    for command in ("check", "train"):
        proc = finetune(command, "r.yaml", "output.dir=notes.txt", cwd=workdir)
        one_error_line(proc, "output.dir", "notes.txt", "is a file")
    assert (workdir / "notes.txt").read_text() == "mine"


def test_merge_takes_a_run_folder_and_refuses_a_full_fine_tune_in_one_line(tmp_path, tiny_model, capsys):
    lora_run, _ = run(make_recipe(tmp_path, tiny_model, "lora", lora={"r": 4}))
    assert cli_main(["merge", str(lora_run), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    full_run, _ = run(make_recipe(tmp_path, tiny_model, "full"))
    capsys.readouterr()
    for folder in (full_run, full_run / "final"):
        assert cli_main(["merge", str(folder), str(tmp_path / "m2")]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "full model" in err and "nothing to merge" in err
    assert not (tmp_path / "m2").exists()
    # Refused before torch is imported (seconds, not the import of torch, transformers and peft).
    code = (f"import sys; from finetune.cli import main; rc = main(['merge', {str(full_run)!r}, {str(tmp_path / 'm2')!r}]);"
            " print(rc, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'peft', 'transformers')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split("\n")[-2] == "2 []", (done.stdout, done.stderr)


# ---------------------------------------------------------------- YAML 1.1 booleans


def test_yaml_words_that_mean_booleans_are_taken_as_the_word_they_were(tmp_path, tiny_model):
    path = make_recipe(tmp_path, tiny_model)
    text = path.read_text() + "\n"
    data = yaml.safe_load(text)
    data["train"]["mixed_precision"] = "no"
    path.write_text(yaml.safe_dump(data).replace("mixed_precision: 'no'", "mixed_precision: no"))
    assert "mixed_precision: no\n" in path.read_text()  # unquoted: YAML 1.1 reads it as false
    assert load_recipe(path).train.mixed_precision == "no"
    assert load_recipe(path, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_recipe(path, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
    from finetune.recipe import RecipeError

    with pytest.raises(RecipeError, match="train.schedule"):  # no word of that key's choices is a boolean
        load_recipe(path, ["train.schedule=yes"])


# ---------------------------------------------------------------- data checked before the model loads


def test_chat_format_on_text_rows_is_refused_before_loading_and_suggests_format_text(workdir):
    write_jsonl(workdir / "data" / "notes.jsonl", [{"text": "a note"}, {"text": "another"}])
    override = "data.train=[{path: data/notes.jsonl, format: chat}]"
    for command in ("check", "train"):
        proc = finetune(command, "r.yaml", override, cwd=workdir)
        one_error_line(proc, "data/notes.jsonl", "messages", "format: text")
    assert not (workdir / "runs" / "r").exists()  # train stopped before writing its run folder


def test_prompts_longer_than_max_length_are_refused_before_loading(workdir):
    proc = finetune("check", "r.yaml", "data.max_length=6", cwd=workdir)
    one_error_line(proc, "row 0", "no target tokens within data.max_length=6", "Raise `data.max_length`")
    proc = finetune("check", "r.yaml", "data.max_length=48", cwd=workdir)
    assert proc.returncode == 0, proc.stderr


def test_an_empty_data_file_and_missing_csv_columns_are_named(workdir):
    (workdir / "data" / "empty.jsonl").write_text("")
    proc = finetune("check", "r.yaml", "data.train=[{path: data/empty.jsonl, format: text}]", cwd=workdir)
    one_error_line(proc, "data/empty.jsonl", "no rows")
    (workdir / "data" / "qa.csv").write_text("question,answer\nhi,hello\n")
    proc = finetune("check", "r.yaml", "data.train=[{path: data/qa.csv, format: instruction}]", cwd=workdir)
    one_error_line(proc, "qa.csv", "instruction", "output", "['answer', 'question']", "columns: {instruction:")


def test_the_kl_to_base_prompts_are_checked_like_any_dataset(workdir):
    write_jsonl(workdir / "data" / "notes.jsonl", [{"text": "a note"}, {"text": "another"}])
    proc = finetune("check", "r.yaml", "train.kl_to_base={datasets: [{path: data/notes.jsonl, format: chat}]}",
                    cwd=workdir)
    one_error_line(proc, "train.kl_to_base.datasets[0]", "data/notes.jsonl", "messages", "format: text")
    proc = finetune("check", "r.yaml", "train.kl_to_base={datasets: [{path: someorg/somedata, format: text}]}",
                    cwd=workdir, hub_cache=workdir / "empty-cache")
    one_error_line(proc, "someorg/somedata", "train.kl_to_base.datasets[0].path", "cannot reach")


# ---------------------------------------------------------------- run folders


def test_a_run_that_failed_before_its_first_checkpoint_restarts_with_the_fixed_recipe(tmp_path, tiny_model, capsys):
    rows = [{"body": f"row {i}"} for i in range(40)]
    rows[30] = {"body": ""}  # beyond the rows checked before loading: found while tokenizing, after loading
    write_jsonl(tmp_path / "notes.jsonl", rows)
    path = make_recipe(tmp_path, tiny_model, data={"train": [{"path": str(tmp_path / "notes.jsonl"),
                                                              "format": "text", "columns": {"text": "body"}}]})
    assert cli_main(["train", str(path)]) == 2
    run_dir = tmp_path / "runs" / "r"
    assert (run_dir / "recipe.yaml").is_file()  # the failed attempt left its recipe
    capsys.readouterr()
    assert cli_main(["train", str(path), "data.on_bad_row=skip"]) == 0  # the fix is not "a different recipe"
    assert "left no checkpoint; starting over" in capsys.readouterr().err
    assert (run_dir / "final").is_dir() and (run_dir / "recipe.before-1.yaml").is_file()


def test_a_refused_change_is_shown_per_key_path():
    old = {"data": {"train": [{"path": "a.csv", "columns": {}}, {"path": "b.csv", "columns": {}}]},
           "train": {"lr": 0.001}}
    new = {"data": {"train": [{"path": "a.csv", "columns": {"text": "body"}}, {"path": "b.csv", "columns": {}}]},
           "train": {"lr": 0.002}}
    assert describe_changes(old, new, ["data.train", "train.lr"]) == [
        "data.train[0].columns: {} -> {'text': 'body'}", "train.lr: 0.001 -> 0.002"]


def test_accept_changes_with_more_steps_trains_a_finished_run_on_from_its_last_checkpoint(tmp_path, tiny_model,
                                                                                          capsys):
    sections = dict(output={"save_every": 3, "keep": 5}, train={"max_steps": 6, "warmup_steps": 2})
    path = make_recipe(tmp_path, tiny_model, "r", **sections)
    run_dir, _ = run(path)
    first_final, first_lrs = weights(run_dir), [m["lr"] for m in metrics(run_dir)]
    capsys.readouterr()
    assert cli_main(["train", str(path), "train.max_steps=10"]) == 2  # changed: refused, pointing at the flag
    assert "--accept-changes" in capsys.readouterr().err
    assert cli_main(["train", str(path), "train.lr=0.01", "--accept-changes"]) == 2  # not a longer run: refused
    assert "only be trained on for longer" in capsys.readouterr().err
    assert cli_main(["train", str(path), "train.max_steps=10", "--accept-changes"]) == 0
    assert "training the finished run on to 10 updates from" in capsys.readouterr().err
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, 11))
    kept = load_file(run_dir / "final.before-1" / "model.safetensors")  # the first run's model, kept aside
    assert kept.keys() == first_final.keys() and all(kept[k].equal(first_final[k]) for k in kept)
    assert not all(kept[k].equal(weights(run_dir)[k]) for k in kept)
    # The schedule is the longer run's from the resumed step on: the same learning rates as a 10-step run.
    straight, _ = run(make_recipe(tmp_path, tiny_model, "straight", output={"save_every": 0},
                                  train={"max_steps": 10, "warmup_steps": 2}))
    assert [m["lr"] for m in metrics(run_dir)][3:] == pytest.approx([m["lr"] for m in metrics(straight)][3:])
    assert metrics(run_dir)[3]["lr"] > first_lrs[3]  # stretched: above where the 6-step run had brought it


def test_extending_a_finished_run_keeps_last_aside_too_under_one_free_n(tmp_path, tiny_model):
    # keep_best left last/ beside final/, and an earlier extension left forgetting.before-1/ alone: the longer run's
    # report must find final/ and last/ free, and nothing kept may be overwritten.
    recipe = load_recipe(make_recipe(tmp_path, tiny_model))
    run_dir = Path(recipe.output.dir)
    for name in ("final", "last", "forgetting", "forgetting.before-1"):
        (run_dir / name).mkdir(parents=True)
        (run_dir / name / "marker").write_text(name)
    write_run_recipe(RunDir(run_dir, None, finished=True, extending=True), recipe)
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "final.before-2", "forgetting", "forgetting.before-1", "forgetting.before-2", "last.before-2", "recipe.yaml"]
    for name in ("final", "last", "forgetting"):
        assert (run_dir / f"{name}.before-2" / "marker").read_text() == name
    assert (run_dir / "forgetting.before-1" / "marker").read_text() == "forgetting.before-1"


# ---------------------------------------------------------------- sweep


def _planned(capsys, *argv) -> list[str]:
    capsys.readouterr()
    assert cli_main(["sweep", *argv, "--print-commands"]) == 0
    return [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]


def test_a_sweep_under_a_launch_config_prints_finetune_launch_commands(tmp_path, tiny_model, capsys):
    import shlex

    from finetune.cli import COMMANDS
    from finetune.launch import split

    path = str(make_recipe(tmp_path, tiny_model, lora={"r": 4}))
    commands = _planned(capsys, path, "--grid", "train.lr=1e-3,3e-3", "--launch-config", "launch/cpu_ddp.yaml")
    assert len(commands) == 2
    for line in commands:
        words = shlex.split(line)
        assert words[1:4] == ["-m", "finetune", "launch"], line
        options, command = split(words[4:], set(COMMANDS))
        assert options == ["--config_file", "launch/cpu_ddp.yaml"] and command[:2] == ["train", path], line


def test_sweep_lora_null_is_a_variant_of_its_own_and_lora_values_apply_to_lora_runs(tmp_path, tiny_model, capsys):
    path = str(make_recipe(tmp_path, tiny_model, lora={"r": 4}))
    commands = _planned(capsys, path, "--grid", "lora.r=8,64", "lora=null")
    assert len(commands) == 3
    assert sum("lora=null" in c for c in commands) == 1
    assert {c.split("lora.r=")[1].split()[0] for c in commands if "lora.r=" in c} == {"8", "64"}
    assert not any("lora=null" in c and "lora.r=" in c for c in commands)


def test_sweep_takes_overrides_anywhere_and_prints_commands_without_eval_tasks(tmp_path, tiny_model, capsys):
    path = str(make_recipe(tmp_path, tiny_model))  # no eval.tasks
    commands = _planned(capsys, path, "train.seed=3", "--grid", "train.lr=1e-3,3e-3", "train.max_steps=7")
    assert len(commands) == 2
    assert all("train.seed=3" in c and "train.max_steps=7" in c for c in commands)
    assert cli_main(["sweep", path, "--grid", "train.lr=1e-3,3e-3"]) == 2  # running one needs tasks to compare
    assert "eval.tasks" in capsys.readouterr().err


def test_the_readme_and_help_sweep_examples_make_the_runs_they_describe(tmp_path, tiny_model, capsys):
    from finetune.cli import EPILOG

    readme = (ROOT / "README.md").read_text()
    examples = [line.split("finetune sweep ", 1)[1].split("`")[0].split("#")[0].split()
                for line in (readme + EPILOG).splitlines() if "finetune sweep " in line and "--grid" in line]
    assert len(examples) >= 2
    path = str(make_recipe(tmp_path, tiny_model, lora={"r": 4}))
    for words in examples:
        grid = [w for w in words[words.index("--grid") + 1:] if "=" in w]
        lrs = next(w for w in grid if w.startswith("train.lr=")).split("=")[1].split(",")
        ranks = next(w for w in grid if w.startswith("lora.r=")).split("=")[1].split(",")
        commands = _planned(capsys, path, "--grid", *grid)
        recipes = {tuple(c.split()[4:-1]) for c in commands}
        assert len(commands) == len(recipes) == len(lrs) * (len(ranks) + 1), words  # LoRA ranks, and full
        assert sum("lora=null" in c for c in commands) == len(lrs)


# ---------------------------------------------------------------- multi-process launches


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_launch_error_is_printed_once_by_the_main_process_without_a_traceback(tmp_path, tiny_model):
    recipe = make_recipe(tmp_path, tiny_model)
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "launch" / "fsdp.yaml"), "--num_processes", "2", "--main_process_port",
                           str(free_port()), "-m", "finetune", "train", str(recipe)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "launch/cpu_ddp.yaml" in ours[0], proc.stderr[-3000:]
    assert f'File "{ROOT / "finetune"}' not in proc.stderr  # no traceback from finetune's own processes
    # torchrun's summary of the failed launch names the same cause, not "To enable traceback see ...".
    assert f"traceback : {ours[0]}" in proc.stderr
    assert not (tmp_path / "runs" / "r").exists()  # refused before the run folder was written


@pytest.mark.multiprocess
def test_finetune_launch_refuses_fsdp_without_gpus_in_one_line_before_any_rank_starts(tmp_path, tiny_model):
    import torch

    if torch.accelerator.is_available():
        pytest.skip("this machine has an accelerator: FSDP can run here")
    recipe = make_recipe(tmp_path, tiny_model)
    proc = finetune("launch", "--config_file", str(ROOT / "launch" / "fsdp.yaml"), "--num_processes", "2",
                    "--main_process_port", str(free_port()), "train", str(recipe), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: "), proc.stderr
    assert "fsdp.yaml asks for FSDP" in proc.stderr and "launch/cpu_ddp.yaml" in proc.stderr
    assert not (tmp_path / "runs" / "r").exists()  # no rank started (a rank writes the run folder first)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_finetune_launch_ends_a_failed_launch_with_the_ranks_one_line_and_their_exit_status(tmp_path, tiny_model):
    # Refused by the ranks themselves (the launcher cannot know the number of processes before accelerate does), so
    # this launch really starts 2 processes over gloo, and fails.
    recipe = make_recipe(tmp_path, tiny_model)
    proc = finetune("launch", "--config_file", str(ROOT / "launch" / "cpu_ddp.yaml"), "--num_processes", "2",
                    "--main_process_port", str(free_port()), "train", str(recipe), "--new-run", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    # Rank 0 prints its own line; when another rank fails first, the launcher stops rank 0 before it can, and names
    # the rank that said it. Either way: one line, the ranks' words.
    assert len(lines) == 1 and re.match(r"error: (rank 1: )?--new-run works in a single process", lines[0]), proc.stderr
    assert "in a launch of 2 processes" in lines[0]  # the ranks said it, not the launcher


def _stop_launch_while_training(tmp_path, tiny_model, options: list[str], stop) -> subprocess.CompletedProcess:
    """`finetune launch OPTIONS train` until rank 0 logs a step, then stop(proc)."""
    import signal
    import time

    recipe = make_recipe(tmp_path, tiny_model, train={"max_steps": 4000})  # a line every 200 updates
    # HF_HOME holds accelerate's default config when `accelerate config` made one: none here.
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "launch", *options, "train", str(recipe)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "HF_HOME": str(tmp_path / "hf")})
    seen, deadline = [], time.monotonic() + 240
    while time.monotonic() < deadline:  # training once a step is logged
        line = proc.stderr.readline()
        seen.append(line)
        if line.startswith("step ") or not line:
            break
    try:
        assert seen[-1].startswith("step "), "".join(seen)[-3000:]
        stop(proc)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = "".join(seen) + rest
    assert "checkpoint saved. Rerun the same command to resume." in rest, err[-3000:]
    assert "Traceback" not in err and "torch/distributed/elastic" not in err, err[-3000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_finetune_launch_stopped_by_sigterm_says_where_the_ranks_stopped_and_nothing_of_its_own(tmp_path, tiny_model):
    import signal

    # A scheduler's preemption: SIGTERM to the launcher (as SLURM sends it), which torch elastic passes to the ranks.
    stopped = _stop_launch_while_training(tmp_path, tiny_model, ["--config_file", str(ROOT / "launch" / "cpu_ddp.yaml"),
                                                                 "--main_process_port", str(free_port())],
                                          lambda proc: proc.send_signal(signal.SIGTERM))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_a_finetune_launch_without_a_config_says_so_once_and_waits_for_its_checkpoint(tmp_path, tiny_model, stop):
    import signal

    from finetune.preemption import EXIT_PREEMPTED

    # No launch config at all: accelerate's defaults, one process. Ctrl-C reaches the terminal's whole process group:
    # the launcher and the process it started, which saves a checkpoint while the launcher waits for it (accelerate
    # 1.16's own launcher would SIGTERM it at once, then kill it). A scheduler's SIGTERM to the launcher alone is
    # passed on to the process.
    signals = {"ctrl-c": lambda proc: os.killpg(proc.pid, signal.SIGINT),
               "sigterm": lambda proc: proc.send_signal(signal.SIGTERM)}
    stopped = _stop_launch_while_training(tmp_path, tiny_model, [], signals[stop])
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr[-3000:]
    notes = [line for line in stopped.stderr.splitlines() if line.startswith("note: no launch config")]
    assert len(notes) == 1 and "1 process(es)" in notes[0], stopped.stderr[-3000:]
    assert "were not passed to `accelerate launch`" not in stopped.stderr  # accelerate's six-line list of defaults


def test_finetune_launch_splits_accelerates_options_from_finetunes_command():
    from finetune.cli import COMMANDS
    from finetune.launch import split

    words = set(COMMANDS)
    assert split(["--config_file", "c.yaml", "--num_processes", "2", "train", "r.yaml", "lora=null"], words) == (
        ["--config_file", "c.yaml", "--num_processes", "2"], ["train", "r.yaml", "lora=null"])
    # A command word as an option's value is that value; after a flag it is the command.
    assert split(["--config_file", "train", "train", "r.yaml"], words) == (["--config_file", "train"],
                                                                           ["train", "r.yaml"])
    assert split(["--use_fsdp", "eval", "b", "t"], words) == (["--use_fsdp"], ["eval", "b", "t"])
    with pytest.raises(Exception, match="needs a finetune command"):
        split(["--config_file", "c.yaml"], words)
    # accelerate's own --debug would turn a failed launch into exit status 0: refused, pointing at finetune's.
    assert cli_main(["launch", "--config_file", "c.yaml", "--debug", "train", "r.yaml"]) == 2


def test_finetune_launch_names_a_launch_config_accelerate_cannot_use(tmp_path, tiny_model, capsys):
    recipe = str(make_recipe(tmp_path, tiny_model))
    broken = tmp_path / "broken.yaml"
    broken.write_text("distributed_type: [\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("distributed_type: MULTI_WHAT\n")
    for config, words in ((tmp_path / "missing.yaml", "does not exist"), (broken, "line 2"), (unknown, "MULTI_WHAT")):
        capsys.readouterr()
        assert cli_main(["launch", "--config_file", str(config), "train", recipe]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: accelerate cannot use the launch config {config}: ") and words in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_finetune_launch_names_what_the_ranks_did_not_say_and_returns_the_root_causes_status(tmp_path, capsys):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from finetune.launch import _report

    def failure(rank: int, exitcode: int, message: str | None, at: int) -> ProcessFailure:
        path = tmp_path / f"{rank}-{at}.json"
        if message is not None:
            path.write_text(json.dumps({"message": {"message": message, "extraInfo": {
                "py_callstack": message, "timestamp": str(at)}}}))
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=exitcode, error_file=str(path))

    same = "error: data/x.jsonl does not exist"
    # Every rank met rank 0's mistake: rank 0 printed it; nothing more.
    assert _report(ChildFailedError("finetune", {0: failure(0, 2, same, 5), 1: failure(1, 2, same, 5)})) == 2
    assert capsys.readouterr().err == ""
    # A mistake met on rank 1 only (a file missing on its node) is named once, with its rank.
    other = "error: data/y.jsonl does not exist"
    assert _report(ChildFailedError("finetune", {0: failure(0, 2, same, 6), 1: failure(1, 2, other, 6),
                                                 3: failure(3, 2, other, 6)})) == 2
    assert capsys.readouterr().err == "error: rank 1: data/y.jsonl does not exist\n"
    # A crash (a traceback printed by the rank, no error file) or a signal: which rank, how it ended.
    assert _report(ChildFailedError("finetune", {1: failure(1, 1, None, 7)})) == 1
    assert "error: the launch failed: rank 1 exited with code 1" in capsys.readouterr().err
    assert _report(ChildFailedError("finetune", {0: failure(0, -9, None, 8)})) == 137
    assert "rank 0 was killed by signal SIGKILL" in capsys.readouterr().err


def test_a_mistake_met_on_another_rank_only_reaches_torchruns_summary_without_a_second_console_line(
        tmp_path, tiny_model, monkeypatch, capsys):
    # E.g. output.dir or a data file that exists on node 0 but not on this node: this rank alone fails.
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    (tmp_path / "notes.txt").write_text("mine")
    assert cli_main(["check", str(make_recipe(tmp_path, tiny_model)), f"output.dir={tmp_path / 'notes.txt'}"]) == 2
    assert "error:" not in capsys.readouterr().err  # rank 0 says it on the console when it fails alike
    message = json.loads(error_file.read_text())["message"]["message"]
    assert message.startswith("error: ") and "notes.txt" in message


def test_debug_keeps_the_traceback(workdir):
    proc = finetune("--debug", "check", "r.yaml", "model.path=data/tiny-lama", cwd=workdir)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "RecipeError" in proc.stderr
