"""Crashes, preemption, numerical and storage faults: nothing a user made is lost, a resumed run ends where an
uninterrupted one does."""

import errno
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import assert_close, make_recipe, metrics, run, weights

import finetune.train
from finetune.checkpoint import latest_verified_checkpoint
from finetune.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
# Long enough to be interrupted at a random step, short enough for two CPU cores.
LONG = dict(train={"max_steps": 40, "batch_size": 2, "grad_accum": 2, "warmup_steps": 4},
            output={"save_every": 5, "keep": 2}, lora={"r": 4, "dropout": 0.1})


def finetune_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "finetune", "train", *args]


def logged_steps(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def newest_complete_checkpoint(run_dir: Path) -> Path:
    """What a resume must start from, found without finetune's code: a checkpoint folder gets its final name only
    once its progress record is written, so the newest `step-N` holding one."""
    done = [p for p in (run_dir / "checkpoints").glob("step-*") if (p / "progress.json").is_file()]
    assert done, "no complete checkpoint: the resume would test nothing"
    return max(done, key=lambda p: int(p.name.removeprefix("step-")))


def start_and_wait_for_step(cmd: list[str], run_dir: Path, step: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # a guard against a hang, not a measure of speed
    while logged_steps(run_dir) < step:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never got there"
        time.sleep(0.01)
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    """An uninterrupted run of the LONG recipe, in a child process like the interrupted ones."""
    tmp = tmp_path_factory.mktemp("reference")
    recipe = make_recipe(tmp, tiny_model, "straight", **LONG)
    proc = subprocess.run(finetune_cmd(str(recipe)), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return weights(tmp / "runs" / "straight"), metrics(tmp / "runs" / "straight")


@pytest.mark.slow
def test_kill_9_at_random_steps_then_resume_ends_with_the_same_weights(tmp_path, tiny_model, reference):
    """Killed at three random steps (seeded), each start resuming from the newest complete checkpoint the last one
    left, then run to the end: the same weights and losses as the uninterrupted run. One chain of starts, so each kill
    also lands on a run that was itself resumed."""
    recipe = make_recipe(tmp_path, tiny_model, "killed", **LONG)
    run_dir = tmp_path / "runs" / "killed"
    rng = random.Random(0)
    # Step 5 is logged before it is saved: once step 6 is logged, the first checkpoint exists. A killed run may log
    # a step or two more before the signal lands; steps at least 5 apart keep the next wait on the resumed run.
    stops = [rng.randint(6, 14), rng.randint(19, 27), rng.randint(32, 38)]
    checkpoint = None
    for stop in stops:
        proc = start_and_wait_for_step(finetune_cmd(str(recipe)), run_dir, stop)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        if checkpoint is not None:
            assert f"resuming from {checkpoint} (step " in out, out[-2000:]
        checkpoint = newest_complete_checkpoint(run_dir)
    resumed = subprocess.run(finetune_cmd(str(recipe)), cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {checkpoint} (step " in resumed.stdout, resumed.stdout[-2000:]
    assert_close(weights(run_dir), reference[0], atol=0)
    assert [m["loss"] for m in metrics(run_dir)] == [m["loss"] for m in reference[1]]


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [1, 3])
def test_kill_9_while_a_checkpoint_is_written_is_never_trusted(tmp_path, tiny_model, reference, kill_at):
    recipe = make_recipe(tmp_path, tiny_model, "killed", **LONG)
    run_dir = tmp_path / "runs" / "killed"
    crashed = subprocess.run([sys.executable, str(ROOT / "tests" / "crash_worker.py"), str(kill_at), str(recipe)],
                             cwd=ROOT, capture_output=True, text=True)
    assert crashed.returncode == -signal.SIGKILL
    assert (run_dir / "checkpoints" / f".tmp-step-{5 * kill_at}").is_dir()  # the half-written one
    resumed = subprocess.run(finetune_cmd(str(recipe)), cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    if kill_at > 1:
        assert f"resuming from {run_dir / 'checkpoints' / f'step-{5 * (kill_at - 1)}'} (step " in resumed.stdout
    else:  # the only checkpoint was the half-written one: start over
        assert "resuming from" not in resumed.stdout
    assert_close(weights(run_dir), reference[0], atol=0)


def test_a_corrupted_checkpoint_fails_its_checksum_and_the_previous_one_is_used(tmp_path, tiny_model, capsys):
    recipe = make_recipe(tmp_path, tiny_model, train={"max_steps": 6}, output={"save_every": 2, "keep": 5})
    straight, _ = run(recipe)
    expected = weights(straight)
    (straight / "final").rename(tmp_path / "first-final")
    state = straight / "checkpoints" / "step-4" / "optimizer.bin"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one bit pattern flipped: only the checksum can tell
    state.write_bytes(bytes(data))
    capsys.readouterr()
    run(recipe)
    out, err = capsys.readouterr()
    assert f"{straight / 'checkpoints' / 'step-4'} does not match its recorded checksums" in err
    assert f"resuming from {straight / 'checkpoints' / 'step-2'} (step 2 of 6)" in out
    assert_close(weights(straight), expected, atol=0)


def test_a_corrupted_checkpoint_is_reported_by_the_main_process_only(tmp_path, monkeypatch, capsys):
    step = tmp_path / "checkpoints" / "step-2"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes(b"weights")
    (step / "progress.json").write_text(json.dumps({"files": {"model.safetensors": [7, "0" * 64]}}))
    for rank, said in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert latest_verified_checkpoint(tmp_path / "checkpoints") is None
        assert ("does not match its recorded checksums" in capsys.readouterr().err) == said


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_exits_75_then_resumes(tmp_path, tiny_model, reference):
    recipe = make_recipe(tmp_path, tiny_model, "stopped", **LONG)
    run_dir = tmp_path / "runs" / "stopped"
    proc = start_and_wait_for_step(finetune_cmd(str(recipe)), run_dir, 12)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)  # a guard against a hang, not a measure of speed
    assert proc.returncode == 75, err
    step = int(err.split("stopped by signal after step ")[1].split(";")[0])
    assert 12 <= step < 40 and metrics(run_dir)[-1]["step"] == step  # stopped at a step boundary, not at the end
    assert newest_complete_checkpoint(run_dir) == run_dir / "checkpoints" / f"step-{step}"
    assert not (run_dir / "final").exists()
    resumed = subprocess.run(finetune_cmd(str(recipe)), cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {run_dir / 'checkpoints' / f'step-{step}'} (step {step} of 40)" in resumed.stdout
    assert_close(weights(run_dir), reference[0], atol=0)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, tiny_model, monkeypatch):
    real, calls = finetune.train.token_loss_sum, []

    def poisoned(model, batch):
        calls.append(1)
        loss = real(model, batch)
        return loss * float("nan") if len(calls) in (3, 4) else loss

    monkeypatch.setattr(finetune.train, "token_loss_sum", poisoned)
    run_dir, model = run(make_recipe(tmp_path, tiny_model, train={"max_steps": 6}))
    assert metrics(run_dir)[-1]["skipped_steps"] == 2
    assert all(torch.isfinite(v).all() for v in weights(run_dir).values())
    assert all(m["loss"] == m["loss"] for m in metrics(run_dir))  # no NaN reaches the log


def test_too_many_non_finite_steps_in_a_row_stop_the_run_with_advice(tmp_path, tiny_model, monkeypatch, capsys):
    real = finetune.train.token_loss_sum
    monkeypatch.setattr(finetune.train, "token_loss_sum", lambda m, b: real(m, b) * float("inf"))
    recipe = make_recipe(tmp_path, tiny_model, train={"max_steps": 6, "max_nonfinite_in_row": 1})
    assert cli_main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "2 updates in a row had a non-finite loss or gradient" in err and "train.lr" in err
    assert not (tmp_path / "runs" / "r" / "final").exists()


def test_disk_full_during_a_save_keeps_the_previous_checkpoint_and_the_run_resumable(tmp_path, tiny_model,
                                                                                       monkeypatch, capsys):
    recipe = make_recipe(tmp_path, tiny_model, train={"max_steps": 6}, output={"save_every": 2, "keep": 5})
    real, calls = Accelerator.save_state, []

    def full_disk(self, output_dir, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            real(self, output_dir, *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, output_dir, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    assert cli_main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    run_dir = tmp_path / "runs" / "r"
    assert "No space left on device" in err and "step-2" in err and "rerun the same command" in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2"]
    monkeypatch.undo()
    assert cli_main(["train", str(recipe)]) == 0
    assert f"resuming from {run_dir / 'checkpoints' / 'step-2'} (step 2 of 6)" in capsys.readouterr().out


@pytest.fixture
def read_only_dir(tmp_path):
    """A real read-only file system (root ignores permission bits, so chmod would prove nothing)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, f"this test needs to mount a read-only tmpfs: {proc.stderr}"
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_read_only_output_folder_is_a_clear_error_before_any_loading(tmp_path, tiny_model, read_only_dir, capsys):
    recipe = make_recipe(tmp_path, tiny_model, output={"dir": str(read_only_dir / "run")})
    assert cli_main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write to the output folder {read_only_dir / 'run'}" in err and "Read-only file system" in err


def test_metrics_line_cut_by_a_crash_is_dropped_on_resume(tmp_path, tiny_model):
    recipe = make_recipe(tmp_path, tiny_model, train={"max_steps": 6}, output={"save_every": 2, "keep": 5})
    run_dir, _ = run(recipe)
    (run_dir / "final").rename(tmp_path / "old-final")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    run(recipe)
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert all(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())


def test_two_processes_writing_one_file_atomically_never_trip_on_each_other(tmp_path):
    # A pruning sweep's workers rewrite one calibration file; with one shared file aside, the second rename found it
    # gone (FileNotFoundError, seen in CI). Each writes 300 times; the file ends whole, as one writer left it.
    target = tmp_path / "shared.jsonl"
    code = ("import sys; from pathlib import Path; from finetune.files import atomic_write_text\n"
            "for i in range(300): atomic_write_text(Path(sys.argv[1]), (sys.argv[2] + '\\n') * 200)")
    writers = [subprocess.Popen([sys.executable, "-c", code, str(target), name], stderr=subprocess.PIPE, text=True)
               for name in ("a", "b")]
    errors = [w.communicate(timeout=120)[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    lines = target.read_text().splitlines()
    assert len(lines) == 200 and len(set(lines)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["shared.jsonl"]  # nothing left aside
