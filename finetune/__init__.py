"""finetune: fine-tune pretrained language models with Accelerate and measure what they forgot."""

__version__ = "0.1.0"

import logging

# bitsandbytes, which peft imports whenever it is installed, warns on CPU that the optional `kernels` package (a
# kernel fetched from the hub) is missing; its own CPU kernels, which finetune uses, need nothing more.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
