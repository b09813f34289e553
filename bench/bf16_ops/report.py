"""Side-by-side summary of bench/bf16_ops/{plain,finetune,...}.json written by audit.py.
    python bench/bf16_ops/report.py [names...] [--sites]"""
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent
args = [a for a in sys.argv[1:] if not a.startswith("--")]
names = args or ["plain", "finetune"]
show_sites = "--sites" in sys.argv


def cls(dt):
    ds = set(dt.split(","))
    return "bf16" if ds == {"bfloat16"} else "fp32" if ds == {"float32"} else "mixed:" + dt


summ = {}
for n in names:
    d = json.loads((ROOT / f"{n}.json").read_text())
    s = defaultdict(float)
    for kind, ph, op, ind, outd, where, cnt, fl, by in d["sites"]:
        if kind in ("matmul", "attn"):  # attention classed by its query's dtype (logsumexp is always fp32)
            s[f"{ph} {kind} GFLOP {cls(ind if kind == 'matmul' else ind.split(',')[0])}"] += fl / 1e9
        if kind == "cast":
            s[f"{ph} casts n"] += cnt
            s[f"{ph} casts MB"] += by / 1e6
            s[f"{ph} cast {ind}->{outd} MB"] += by / 1e6
        if kind == "attn":
            s[f"{ph} attn op {op} [{ind}->{outd}] calls"] += cnt
    summ[n] = s
    print(n, {k: v for k, v in d.items() if k not in ("rows", "sites")})

keys = sorted({k for s in summ.values() for k in s})
print(f"\n{'metric':60s}" + "".join(f"{n:>16s}" for n in names))
for k in keys:
    print(f"{k:60s}" + "".join(f"{summ[n].get(k, 0):16.3f}" for n in names))
for ph in ("fwd", "bwd"):
    for n in names:
        tot = sum(v for k, v in summ[n].items() if k.startswith(f"{ph} ") and "GFLOP" in k)
        bf = sum(v for k, v in summ[n].items() if k.startswith(f"{ph} ") and "GFLOP bf16" in k)
        print(f"{ph} {n}: bf16 share of matmul+attn FLOPs = {bf / tot:.1%} of {tot:.3f} GFLOP")

if show_sites:
    for n in names:
        d = json.loads((ROOT / f"{n}.json").read_text())
        print(f"\n===== {n}: sites (kind phase op in->out  count GFLOP MB  origin)")
        for kind, ph, op, ind, outd, where, cnt, fl, by in sorted(d["sites"], key=lambda r: (r[0], r[1], -r[7], -r[8])):
            if kind == "matmul" and cls(ind) == "bf16" and "--all" not in sys.argv:
                continue
            print(f"{kind:6s} {ph:5s} {op:28s} {ind}->{outd}  n={cnt} {fl / 1e9:.4f}GF {by / 1e6:.2f}MB  {where}")
