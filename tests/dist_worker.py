"""Started by `accelerate launch` in the distributed tests: trains a recipe like `finetune train`, then every rank
saves the weights it ended with, so the test can check that all ranks agree."""

import logging
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from finetune.recipe import load_recipe
from finetune.startup import skip_bitsandbytes

recipe = load_recipe(sys.argv[1], sys.argv[2:])
skip_bitsandbytes(recipe.model.quantization is not None)  # as `finetune train` does: each rank starts 2 s sooner

from finetune.checkpoint import open_run_dir
from finetune.train import train

# What each rank evaluated (finetune/sharing.py's debug lines), for the tests to check that the ranks shared the work.
logging.getLogger("finetune.measure.sharing").setLevel(logging.DEBUG)
logging.getLogger("finetune.measure.sharing").addHandler(logging.StreamHandler(sys.stdout))

model = train(recipe, open_run_dir(recipe, accept_changes=False))
state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
save_file(state, Path(recipe.output.dir) / f"rank{os.environ.get('RANK', '0')}.safetensors")
