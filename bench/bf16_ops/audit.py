"""bf16-autocast dtype audit of one training step: every aten op (below autocast, via a TorchDispatchMode), its input
and output dtypes, FLOPs of matmul-like ops, dtype conversions, and where each came from.

Hardware-independent: which ops run in which dtype does not depend on the CPU, only their speed does (this part of
issue #26 can be answered on a machine without AMX; the time breakdown cannot).

    python bench/bf16_ops/audit.py make             # the tiny SmolLM2-like model folder (in the system's temp dir)
    python bench/bf16_ops/audit.py plain            # (a) transformers + peft under torch.autocast
    python bench/bf16_ops/audit.py finetune         # (b) finetune's make_accelerator/load_model/Collator/train_step
    python bench/bf16_ops/audit.py finetune_mpnull  # (b) with train.mixed_precision null (the launch config's "no")
    python bench/bf16_ops/report.py [--sites]       # the side-by-side table (bench/bf16_ops/README.md quotes it)

Each mode in a process of its own (accelerate's state is per process). Writes bench/bf16_ops/<mode>.json. Phase: fwd / bwd (inside autograd's engine: torch._C._current_graph_task_id())
/ other (clip, optimizer). For backward ops the origin is the forward stack of the autograd node (anomaly mode).
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import traceback
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402
from torch.utils.flop_counter import flop_registry  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent  # the recorded ops
MODEL_DIR = Path(tempfile.gettempdir()) / "finetune-bf16-ops-model"
B, T = 4, 128
aten = torch.ops.aten

MATMUL = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_scaled_mm"}
ATTN_KEY = "scaled_dot_product"
SKIP_FILES = ("/torch/", "audit.py", "<frozen", "contextlib.py", "functools.py")


def attn_flops(name, args, out):
    """Real (causal-halved) FLOPs of CPU/any sdpa kernels: fwd 2 matmuls, bwd 4 (dense convention x 0.5 if causal)."""
    q, k = args[0], args[1]
    b, h, lq, d = q.shape
    lk = k.shape[-2]
    dense = 4 * b * h * lq * lk * d
    causal = any(a is True for a in args[3:6]) if "backward" not in name else any(a is True for a in args[4:10])
    f = dense * (2 if "backward" in name else 1)
    return f // 2 if causal else f


def flops_of(func, args, kwargs, out):
    name = func.__name__.split(".")[0]
    if ATTN_KEY in name:
        return attn_flops(name, args, out)
    fn = flop_registry.get(func._overloadpacket)
    if fn is None or name not in MATMUL:
        return 0
    return int(fn(*args, **kwargs, out_val=out))


def origin_fwd():
    frames = [f for f in traceback.extract_stack()[:-3] if not any(s in f.filename for s in SKIP_FILES)]
    return [short(f.filename, f.lineno, f.name) for f in frames[-3:]][::-1]


def short(fn, line, name):
    for key in ("site-packages/", "/work/main/"):
        if key in fn:
            fn = fn.split(key, 1)[1]
    return f"{fn}:{line}({name})"


def origin_bwd():
    node = torch._C._current_autograd_node()
    if node is None:
        return ["<no node>"]
    tb = node.metadata.get("traceback_") if hasattr(node, "metadata") else None
    head = f"<{node.name()}>"
    if not tb:
        return [head]
    # anomaly traceback_: list of formatted stack strings, innermost last
    lines = []
    for entry in tb:
        for chunk in entry.split('  File "')[1:]:
            fn, rest = chunk.split('", line ', 1)
            line, rest = rest.split(", in ", 1)
            if not any(s in fn for s in SKIP_FILES):
                lines.append(short(fn, int(line), rest.split("\n", 1)[0]))
    return [head] + lines[-3:][::-1]


class Audit(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.rows = defaultdict(lambda: [0, 0, 0, 0])  # key -> count, flops, bytes_in, bytes_out
        self.sites = defaultdict(lambda: [0, 0, 0])  # (kind, phase, op, dtypes, origin) -> count, flops, bytes
        self.phase_override = None

    def phase(self):
        if self.phase_override:
            return self.phase_override
        return "bwd" if torch._C._current_graph_task_id() != -1 else "fwd"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__  # e.g. mm.default
        op = name.split(".")[0]
        ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        in_dt = ",".join(str(a.dtype).replace("torch.", "") for a in ins if a.is_floating_point()) or "-"
        out_dt = ",".join(str(o.dtype).replace("torch.", "") for o in outs if o.is_floating_point()) or "-"
        ph = self.phase()
        fl = flops_of(func, args, kwargs, out)
        bin_ = sum(a.numel() * a.element_size() for a in ins)
        bout = sum(o.numel() * o.element_size() for o in outs)
        r = self.rows[(ph, op, in_dt, out_dt)]
        r[0] += 1; r[1] += fl; r[2] += bin_; r[3] += bout
        kind = None
        conv_bytes = 0
        if op in ("_to_copy", "to") and ins and outs and ins[0].dtype != outs[0].dtype:
            kind, conv_bytes = "cast", bout
            in_dt, out_dt = str(ins[0].dtype)[6:], str(outs[0].dtype)[6:]
        elif op in ("copy_", "copy") and len(ins) >= 2 and ins[0].dtype != ins[1].dtype:
            kind, conv_bytes = "cast", ins[0].numel() * ins[0].element_size()
            in_dt, out_dt = str(ins[1].dtype)[6:], str(ins[0].dtype)[6:]
        elif fl:
            kind = "attn" if ATTN_KEY in op else "matmul"
            shapes = "x".join(str(tuple(a.shape)) for a in ins if a.dim() >= 2)
        elif ATTN_KEY in op or "softmax" in op or op in ("nll_loss_forward", "nll_loss_backward", "gather",
                                                          "scatter_add_", "index", "index_put_", "repeat_interleave"):
            kind = "other"
        if kind:
            where = origin_bwd() if ph == "bwd" else origin_fwd()
            if kind == "matmul":
                where = where + [shapes]
            s = self.sites[(kind, ph, op, in_dt, out_dt, " <- ".join(where))]
            s[0] += 1; s[1] += fl; s[2] += conv_bytes
        return out

    def dump(self, path, extra):
        data = {"rows": [list(k) + v for k, v in self.rows.items()],
                "sites": [list(k) + v for k, v in self.sites.items()], **extra}
        Path(path).write_text(json.dumps(data, indent=1))


# ------------------------------------------------------------------ model and data

def make():
    from transformers import LlamaConfig, LlamaForCausalLM
    # SmolLM2-135M's shape family, shrunk: head_dim 64, GQA 2:1... (SmolLM2: 9 q / 3 kv heads), tied embeddings.
    cfg = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=640, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(MODEL_DIR)
    print("saved", MODEL_DIR)


def token_rows():
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, 8192, (B, T), generator=g)


def run_plain(attn="sdpa"):
    import peft
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    torch.manual_seed(0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    ids = token_rows()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    audit = Audit()
    with torch.autograd.detect_anomaly(check_nan=False), audit:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
    audit.dump(ROOT / f"plain{'' if attn == 'sdpa' else '_' + attn}.json",
               {"loss": loss.item(), "loss_dtype": str(loss.dtype)})
    print("plain loss", loss.item(), loss.dtype)


def run_finetune(variant="finetune"):
    from types import SimpleNamespace
    from transformers import get_scheduler
    from finetune.data import Collator, mask_kind
    from finetune.engine import make_accelerator
    from finetune.model import load_model
    from finetune.recipe import LoraSection, ModelSection, TrainSection
    from finetune import train as ft_train

    tr = TrainSection()
    mp = None if variant == "finetune_mpnull" else "bf16"  # null: as the launch config says (single_device.yaml: "no")
    recipe = SimpleNamespace(train=SimpleNamespace(mixed_precision=mp, grad_accum=1, seed=0, trackers=[]))
    accelerator = make_accelerator(recipe, str(Path(tempfile.mkdtemp()) / "run"))
    torch.manual_seed(0)
    model = load_model(ModelSection(path=str(MODEL_DIR)), LoraSection())  # defaults: sdpa -> finetune_sdpa, r=16
    attn_impl = model.config._attn_implementation
    packing = variant != "finetune_nopack"
    collate = Collator(0, mask_kind(attn_impl, packing))
    ids = token_rows()
    rows = [[(ids[b].tolist(), [1] * T)] for b in range(B)]  # one 128-token example per row, every token a target
    batch = collate(rows)
    batch.pop("n_tokens")
    optimizer = ft_train._optimizer(model, tr)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=0, num_training_steps=10)
    audit = Audit()
    # 'other' phase: clip + optimizer, after accelerator.backward returns
    orig_clip = accelerator.clip_grad_norm_

    def clip(*a, **k):
        audit.phase_override = "other"
        return orig_clip(*a, **k)
    accelerator.clip_grad_norm_ = clip
    with torch.autograd.detect_anomaly(check_nan=False), audit:
        res = ft_train.train_step(accelerator, model, optimizer, scheduler, [batch], tr.max_grad_norm)
    n = int(res.targets)
    audit.dump(ROOT / f"{variant}.json", {"loss": float(res.loss_sum) / n, "attn_impl": attn_impl,
                                          "mask": collate.mask, "batch_shape": list(batch["input_ids"].shape),
                                          "segments": list(batch.get("segment_lengths", ()))})
    print(variant, "loss", float(res.loss_sum) / n, attn_impl, collate.mask, tuple(batch["input_ids"].shape))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "make":
        make()
    elif mode == "plain":
        run_plain()
    elif mode == "plain_eager":
        run_plain("eager")
    else:
        run_finetune(mode)
