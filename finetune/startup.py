"""What a training process can leave unimported. Every rank and every `finetune train` pays its imports again, so a
library it never uses is seconds of every start (and of every test that starts one)."""

from __future__ import annotations

import sys


def skip_bitsandbytes(quantized: bool) -> None:
    """peft imports bitsandbytes whenever it is installed, and bitsandbytes imports torch's compiler stack at once:
    `import finetune.train` took 9.0 s with it and 7.0 s without (2 cores, bitsandbytes 0.50.2, peft 0.21.2). A run
    that quantizes nothing (`model.quantization` unset) never calls it, so before peft is imported it is marked
    absent in this process, and peft's own checks read it as not installed. A process that has imported peft
    already keeps what it has."""
    if not quantized and not {"peft", "bitsandbytes"} & sys.modules.keys():
        sys.modules["bitsandbytes"] = None
