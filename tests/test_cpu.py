import json
import os
import subprocess
import sys

import pytest

# A fresh process each time: the setting is process-wide and cannot be undone.
PROBE = """
import json, resource, sys
import torch
from finetune.cpu import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
first = torch.empty(2**26).fill_(1.0)  # 256 MB, as a first training step's largest blocks
del first
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # later steps' blocks: 64 MB each, above glibc's largest mmap threshold
    block = torch.empty(2**24).fill_(1.0)
    del block
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _probe(mode: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    default, kept = _probe("default"), _probe("keep")
    assert kept["applied"]
    pages = 3 * 2**26 // 4096
    assert default["faults"] > pages / 2  # glibc maps each large block afresh: every page faults again
    assert kept["faults"] < pages / 20  # carved from the freed 256 MB, whose pages are still mapped
    assert not _probe("keep", FINETUNE_KEEP_FREED_MEMORY="0")["applied"]
