"""Measures a tuned model against its base with finetune's ForgettingEval, the ranks sharing the work: called in
process with one rank by tests/test_shared_eval.py, and started there on 2 ranks by `accelerate launch`:

    accelerate launch --config_file launch/cpu_ddp.yaml tests/shared_eval_worker.py SPEC.json

SPEC.json names the base and tuned model folders, the tasks, the cache folder and the output file; each rank writes
what it ended with to the output file with `.rankN.json` as suffix.
"""

import json
import logging
import sys
from pathlib import Path


def measure(spec: dict, ranks) -> dict:
    """{base, tuned: Evaluation as JSON, texts: the drift texts} as `ranks` end with them."""
    from transformers import AutoModelForCausalLM

    from finetune.measure.evaluate import ForgettingEval
    from finetune.model_files import load_tokenizer
    from finetune.recipe import EvalSection, ModelSection
    from finetune.reports.records import to_dict

    section = ModelSection(path=spec["base"], cache_dir=spec["cache"])
    fe = ForgettingEval(EvalSection(tasks=spec["tasks"], limit=spec["limit"], batch_size=4), section,
                        load_tokenizer(section), ranks=ranks)
    base = fe.evaluate_base(AutoModelForCausalLM.from_pretrained(spec["base"]))
    tuned = fe.evaluate(AutoModelForCausalLM.from_pretrained(spec["tuned"]), step=1)
    return {"base": to_dict(base), "tuned": to_dict(tuned), "texts": fe.texts}


if __name__ == "__main__":
    from accelerate import PartialState

    from finetune.measure.sharing import Ranks

    # What each rank evaluated (finetune/sharing.py's debug lines), for the test to check how the work was shared.
    logging.getLogger("finetune.measure.sharing").setLevel(logging.DEBUG)
    logging.getLogger("finetune.measure.sharing").addHandler(logging.StreamHandler(sys.stdout))
    state = PartialState(cpu=True)
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = measure(spec, Ranks(state.process_index, state.num_processes))
    Path(f"{spec['out']}.rank{state.process_index}.json").write_text(json.dumps(out))
