"""Multi-node launches on one machine: launch/multinode_ddp.yaml and launch/multinode_fsdp.yaml as 2 machines of 1
process each (machine ranks 0 and 1, both on 127.0.0.1), and launch/slurm.sh under a fake SLURM (tests/fake_slurm:
srun runs one launcher per node here and passes signals on; scontrol names the nodes and logs requeues)."""

import os
import signal
import subprocess
import time

import pytest
from conftest import make_recipe, metrics, run
from multiproc import ENGINE_WORKER, FSDP_SEEN, LAUNCH, ROOT, accelerate_launch, assert_same_run, finish, free_port

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def two_machines(config, *args: str) -> list[subprocess.CompletedProcess]:
    """The same command on "machine" 0 and 1, as the launch config's header says to run it on each node."""
    port = free_port()
    procs = [accelerate_launch(config, *args, port=port, num_machines=2, num_processes=2, machine_rank=rank,
                               main_process_ip="127.0.0.1", mixed_precision="no") for rank in (0, 1)]
    return [finish(p) for p in procs]


@pytest.mark.parametrize("config", ["multinode_ddp.yaml", "multinode_fsdp.yaml"])
def test_two_machines_end_where_one_process_with_the_same_global_batch_ends(tmp_path, tiny_model, config):
    train = {"max_steps": 4, "lr": 3e-3}
    one = make_recipe(tmp_path, tiny_model, "one", train={**train, "batch_size": 4})
    two = make_recipe(tmp_path, tiny_model, "two", train={**train, "batch_size": 2})
    one_dir, _ = run(one)
    # FSDP runs through the test worker, which lets accelerate set FSDP2 up on CPU and checks that it did.
    args = [str(ENGINE_WORKER), str(two)] if "fsdp" in config else ["-m", "finetune", "train", str(two)]
    machines = two_machines(LAUNCH / config, *args)
    for proc in machines:
        assert proc.returncode == 0, proc.stderr[-5000:]
    assert "on 2 process(es)" in machines[0].stdout  # rank 0 lives on machine 0 and alone prints
    if "fsdp" in config:
        assert FSDP_SEEN in machines[0].stdout
    assert_same_run(one_dir, one_dir.parent / "two")


def slurm_job(tmp_path, recipe) -> subprocess.Popen:
    """`sbatch --nodes=2 launch/slurm.sh RECIPE` as SLURM would start it: the batch script on the first node."""
    env = {**os.environ, "PATH": f"{ROOT / 'tests' / 'fake_slurm'}{os.pathsep}{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "GPUS_PER_NODE": "1",
           "MAIN_PORT": str(free_port()), "FAKE_SLURM_LOG": str(tmp_path / "slurm.log")}
    return subprocess.Popen(["bash", str(LAUNCH / "slurm.sh"), str(recipe)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def test_slurm_job_forwards_sigterm_requeues_and_the_requeued_job_resumes(tmp_path, tiny_model):
    # Enough steps that the signal lands mid-run; train.mixed_precision overrides the config's bf16 (CPU: fp32).
    train = {"max_steps": 30, "lr": 3e-3, "mixed_precision": "no"}
    one = make_recipe(tmp_path, tiny_model, "one", train={**train, "batch_size": 4})
    two = make_recipe(tmp_path, tiny_model, "two", train={**train, "batch_size": 2}, output={"save_every": 0})
    one_dir, _ = run(one)
    two_dir = one_dir.parent / "two"

    job = slurm_job(tmp_path, two)
    deadline = time.monotonic() + 240
    while not (two_dir / "metrics.jsonl").is_file() or len(metrics(two_dir)) < 2:
        assert job.poll() is None and time.monotonic() < deadline, "the job ended or hung before training"
        time.sleep(0.2)
    os.kill(job.pid, signal.SIGTERM)  # SLURM signals the batch shell (--signal=B:TERM@120), not the ranks
    first = finish(job)
    log = (tmp_path / "slurm.log").read_text()
    assert first.returncode == 0, first.stderr[-5000:]
    assert "SIGTERM: stopping ranks and requeueing job 4242" in first.stdout
    assert "srun: forwarding SIGTERM to 2 nodes" in log and "scontrol requeue 4242" in log
    assert "--num_machines '2'" in log or "--num_machines 2" in log
    checkpoints = sorted((two_dir / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and not (two_dir / "final").exists()
    stopped_at = int(checkpoints[0].name.removeprefix("step-"))
    assert stopped_at < 30 and "stopped by signal" in first.stderr

    again = finish(slurm_job(tmp_path, two))  # the requeued job: the same script, from the start
    assert again.returncode == 0, again.stderr[-5000:]
    assert f"resuming from {checkpoints[0]} (step {stopped_at} of 30)" in again.stdout
    assert_same_run(one_dir, two_dir)
