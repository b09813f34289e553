"""The benchmark runs end to end (not how fast: speed is measured by bench/throughput.py itself, never by a test)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmark_on_the_tiny_model_prints_every_row_with_its_ratios(tmp_path):
    out = tmp_path / "results.md"
    proc = subprocess.run([sys.executable, "bench/throughput.py", "--quick", "--models", "tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| tiny")]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [
        (mode, impl) for mode in ("lora", "full") for impl in ("finetune", "trl", "trl-packing", "torch")]
    for r in rows:
        assert float(r[4].replace(",", "")) > 0  # total tok/s
        ratios = [c.strip() for c in r[6:8]]
        assert sum(c == "-" for c in ratios) == (1 if r[2].strip().startswith("trl") else 0)
        assert all(re.fullmatch(r"\d+\.\d\d", c) for c in ratios if c != "-")
        assert re.fullmatch(r"\d+%", r[9].strip())  # MFU
    assert out.read_text() in proc.stdout
