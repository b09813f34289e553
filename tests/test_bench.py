"""The benchmark runs end to end (not how fast: speed is measured by bench/throughput.py itself, never by a test)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ["finetune", "trl", "trl-packing", "torch", "finetune-gc", "trl-gc"]


@pytest.mark.slow
def test_quick_benchmark_on_the_tiny_model_prints_every_row_with_its_ratios(tmp_path):
    out = tmp_path / "results.md"
    # One mode: every implementation's code path runs either way (full fine-tuning differs only in what is trainable),
    # and each run is a process of its own whose imports cost more than its steps.
    proc = subprocess.run([sys.executable, "bench/throughput.py", "--quick", "--models", "tiny", "--modes", "lora",
                           "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.read_text().splitlines()
            if line.startswith("| tiny")]
    assert [(r[1], r[2]) for r in rows] == [("lora", impl) for impl in IMPLS]
    for r in rows:
        # Every row says how gradient checkpointing was set, and the pairs compare equal settings.
        assert r[3] == ("on" if r[2].endswith("-gc") else "off")
        assert float(r[5].replace(",", "")) > 0  # total tok/s
        has_reference = r[2] in ("finetune", "torch", "trl-packing", "finetune-gc")
        assert (r[7] != "-") == has_reference and (r[8] != "-") == (r[2] in ("finetune", "torch"))
        assert all(re.fullmatch(r"\d+\.\d\d", c) for c in r[7:9] if c != "-")
        useful, executed = (float(x) for x in r[10].split(" / "))
        assert 0 < useful <= executed * 1.001  # nothing executes less than it needs
        assert re.fullmatch(r"\d+%", r[11]) and re.fullmatch(r"\d+%", r[12])
    # TRL pads its default batches; checkpointing adds a second forward to what is executed.
    by = {(r[1], r[2]): r for r in rows}
    assert float(by["lora", "trl"][6].rstrip("%")) > 0 and by["lora", "finetune"][6] == "0%"
    assert float(by["lora", "finetune-gc"][10].split(" / ")[1]) > float(by["lora", "finetune"][10].split(" / ")[1])
    raw = json.loads(out.with_suffix(".json").read_text())
    assert len(raw["runs"]) == len(rows) and all("useful_flops_per_token" in r for r in raw["runs"])
    assert out.read_text() in proc.stdout
