"""Contracts with the private parts of dependencies that finetune leans on: what each takes, returns and does, as
finetune uses it. A release that changes one fails here, by name ("accelerate changed X"), before a launch or an
evaluation test fails for reasons hard to read; and finetune's guard says so to a user in one line."""

import inspect
import sys

import pytest
import torch
from accelerate import Accelerator
from accelerate.commands import launch as accelerate_launch
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import DistributedType

from finetune.errors import UpstreamChanged


@pytest.fixture
def fresh_state():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _parsed(*options: str):
    return accelerate_launch.launch_command_parser().parse_args([*options, "-m", "finetune", "env"])


def test_accelerate_validates_a_launch_through_a_module_function_it_looks_up_at_call_time(monkeypatch, tmp_path):
    """finetune.launch wraps _validate_launch_command (checks before any rank starts) and replaces simple_launcher
    (Ctrl-C in a one-process launch): launch_command must reach both through the module's globals."""
    seen = {}
    validate = accelerate_launch._validate_launch_command

    def validated(args):
        seen["resolved"] = validate(args)
        return seen["resolved"]

    monkeypatch.setattr(accelerate_launch, "_validate_launch_command", validated)
    monkeypatch.setattr(accelerate_launch, "simple_launcher", lambda args: seen.setdefault("launched", args))
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no default config from `accelerate config`
    accelerate_launch.launch_command(_parsed("--num_processes", "1"))
    launch, defaults, _ = seen["resolved"]  # (args, the config file's values or None, mixed precision's source)
    assert defaults is None and launch.num_processes == 1 and seen["launched"] is launch
    assert (launch.use_fsdp, launch.use_deepspeed, launch.config_file) == (False, False, None)


def test_accelerate_rejects_a_malformed_launch_config_with_an_exception_naming_it(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("distributed_type: MULTI_WHAT\n")
    with pytest.raises(Exception, match="MULTI_WHAT"):
        accelerate_launch._validate_launch_command(_parsed("--config_file", str(broken)))


def test_accelerate_prepares_a_one_process_launch_as_a_command_and_its_environment(tmp_path, monkeypatch):
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    launch, _, _ = accelerate_launch._validate_launch_command(_parsed("--num_processes", "1"))
    command, env = prepare_simple_launcher_cmd_env(launch)
    assert command[0] == sys.executable and command[-3:] == ["-m", "finetune", "env"], command
    assert isinstance(env, dict) and env["PATH"]


def test_accelerate_keeps_the_process_state_in_a_shared_dict_with_the_distributed_type(fresh_state):
    """finetune.engine.check_launch reads it before the Accelerator exists; the tests' CPU workers relabel it."""
    PartialState(cpu=True)
    assert isinstance(PartialState._shared_state, dict)
    assert PartialState._shared_state["distributed_type"] is DistributedType.NO


def test_accelerate_keeps_prepared_models_and_optimizers_in_lists_save_state_reads(fresh_state, tmp_path):
    """finetune.engine saves a sharded LoRA model itself by emptying these lists around save_state."""
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert accelerator._models == [model] and accelerator._optimizers == [optimizer]
    models, optimizers = accelerator._models, accelerator._optimizers
    accelerator._models, accelerator._optimizers = [], []
    accelerator.save_state(str(tmp_path / "apart"))
    accelerator._models, accelerator._optimizers = models, optimizers
    accelerator.save_state(str(tmp_path / "whole"))
    names = {p.name for p in (tmp_path / "whole").iterdir()} - {p.name for p in (tmp_path / "apart").iterdir()}
    assert names and all(n.startswith(("model", "optimizer")) for n in names), names


def test_lm_eval_loads_a_task_yaml_without_resolving_its_functions(tmp_path):
    """finetune.measure.evaluate reads a task file's name before lm-eval indexes its folder."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = tmp_path / "t.yaml"
    path.write_text("task: t\ndoc_to_text: !function utils.nowhere\n")
    config = load_yaml(path, resolve_func=False)
    assert config["task"] == "t" and "utils.nowhere" in str(config["doc_to_text"])


def test_lm_eval_describes_the_machine_through_a_module_function_simple_evaluate_looks_up_at_call_time():
    # finetune swaps lm_eval.evaluator.add_env_info for a versions-only one (measure/tasks.py): it must be a global
    # that simple_evaluate reads when it runs, and take the results dict it adds to.
    import inspect

    import lm_eval.evaluator as evaluator

    body = inspect.unwrap(evaluator.simple_evaluate)  # lm-eval wraps it (positional-argument checks)
    assert body.__globals__ is vars(evaluator) and "add_env_info" in body.__code__.co_names
    assert list(inspect.signature(evaluator.add_env_info).parameters) == ["storage"]
    storage = {}
    evaluator.add_env_info(storage)
    assert {"pretty_env_info", "transformers_version", "lm_eval_version", "upper_git_hash"} <= storage.keys()


def test_a_missing_private_part_is_one_line_naming_the_release(monkeypatch):
    from importlib.metadata import version

    from finetune.engine import _prepared

    class Renamed:  # as a release that renamed the lists would leave an Accelerator
        models: list = []

    with pytest.raises(UpstreamChanged) as raised:
        _prepared(Renamed())
    message = str(raised.value)
    assert f"accelerate {version('accelerate')} no longer has `Accelerator._models" in message
    assert "\n" not in message and "requirements.lock" in message


def _hflm(base_dir, spy):
    from transformers import AutoModelForCausalLM

    from finetune.model_files import load_tokenizer
    from finetune.recipe import ModelSection

    tokenizer = load_tokenizer(ModelSection(path=str(base_dir)))
    return spy(pretrained=AutoModelForCausalLM.from_pretrained(base_dir), tokenizer=tokenizer, batch_size=2), tokenizer


def test_lm_eval_scores_log_likelihoods_through_the_token_level_method_finetune_overrides(base_dir):
    """SharedHFLM._loglikelihood_tokens (measure/prefix_sharing.py) receives (key, context ids, continuation ids)
    per request and returns (log-likelihood, greedy) in the same order; it reads the attributes below."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    seen = []

    class Spy(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            seen.extend(requests)
            return [(-float(i), i % 2 == 0) for i in range(len(requests))]

    lm, tokenizer = _hflm(base_dir, Spy)
    pairs = [("Q: what is a? A:", " one"), ("Q: what is b? A:", " two")]
    requests = [Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    assert lm.loglikelihood(requests) == [(-0.0, True), (-1.0, False)]
    assert [key for key, _, _ in seen] == pairs
    for (context, continuation), (_, context_ids, continuation_ids) in zip(pairs, seen):
        assert tokenizer.decode(context_ids + continuation_ids) == context + continuation
        assert continuation_ids and tokenizer.decode(continuation_ids).strip() == continuation.strip()
    assert lm.backend == "causal" and isinstance(lm.max_length, int) and isinstance(lm.device, torch.device)
    assert lm.mixed_precision_dtype is None and lm.softmax_dtype is None and callable(lm.cache_hook.add_partial)


def test_lm_eval_generates_through_a_method_given_the_padded_prompts_and_their_mask(base_dir):
    """SharedHFLM._model_generate (measure/prefix_sharing.py) is called with left-padded prompt ids and an
    `attention_mask` keyword, and lm-eval's own one passes the ids as `input_ids` and every other keyword (a cache
    among them) on to the model's generate."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    calls = []

    class Spy(HFLM):
        def _model_generate(self, context, max_length, stop, **kwargs):
            calls.append((context, kwargs))
            return super()._model_generate(context, max_length, stop, **kwargs)

    lm, tokenizer = _hflm(base_dir, Spy)
    given = []
    generate = lm.model.generate
    lm.model.generate = lambda **kw: given.append(kw) or generate(**{k: v for k, v in kw.items() if k != "marker"})
    prompts = ["Q: what is a? A:", "Q: what is a much longer b? A:"]
    requests = [Instance("generate_until", doc={}, arguments=(p, {"until": ["\n"], "max_gen_toks": 3}), idx=i)
                for i, p in enumerate(prompts)]
    assert len(lm.generate_until(requests)) == 2
    (context, kwargs), = calls
    mask = kwargs["attention_mask"]
    assert context.shape == mask.shape and context.shape[0] == 2
    assert [tokenizer.decode(ids[m.bool()]) for ids, m in zip(context, mask)] == prompts[::-1]  # longest first
    assert mask[1, 0] == 0 and mask[:, -1].all()  # left padding
    lm._model_generate(context, max_length=context.shape[1] + 2, stop=["\n"], attention_mask=mask, marker=1)
    assert given[-1]["input_ids"] is context and given[-1]["marker"] == 1 and given[-1]["attention_mask"] is mask


def test_bitsandbytes_repacks_a_4bit_layer_for_the_cpu_only_where_its_instance_switch_allows():
    """finetune/model.py's `_one_4bit_kernel` turns off a Linear4bit's instance attribute
    `support_avx512bf16_for_cpu`, which the layer's forward reads before repacking its weights for the CPU (in eval
    mode, without gradients). Checked on any CPU: the switch is on here, the layer repacks when it is on and the
    CPU is forced to report AVX512-BF16, and keeps its weights when it is off."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.nn.modules as modules

    def layer():
        torch.manual_seed(0)
        lin = bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4", compute_dtype=torch.float32)
        lin.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
        return lin.to("cpu").eval()

    on, off = layer(), layer()
    assert hasattr(on, "support_avx512bf16_for_cpu")
    on.support_avx512bf16_for_cpu = True  # as on a CPU with AVX512-BF16
    off.support_avx512bf16_for_cpu = False
    before = off.weight.data.clone()
    with torch.no_grad():
        try:
            on(torch.randn(2, 64))
        except Exception:  # noqa: BLE001  the packed kernel itself may need the instructions this CPU lacks
            pass
        off(torch.randn(2, 64))
    assert getattr(on.weight.quant_state, "packing_format_for_cpu", False), "bitsandbytes changed the repacking"
    assert not getattr(off.weight.quant_state, "packing_format_for_cpu", False) and torch.equal(off.weight.data, before)
    assert "support_avx512bf16_for_cpu" in modules.Linear4bit.forward.__code__.co_names


def test_lm_eval_renders_every_template_through_utils_apply_template_and_its_env(tasks):
    """measure/tasks.py keeps each compiled task template: it replaces lm_eval.utils.apply_template, built on
    utils.env, which lm-eval's Task reaches through the module at every call; the prompts stay the same."""
    import lm_eval.api.task as task_module
    from lm_eval import utils

    from finetune.measure.tasks import _compile_templates_once, load_tasks

    assert hasattr(utils, "env") and callable(utils.env.from_string) and callable(utils.apply_template)
    assert "utils.apply_template(" in inspect.getsource(task_module)
    _, loaded = load_tasks(str(tasks["original"]))
    task = next(iter(loaded.values()))
    docs = list(task.eval_docs)[:3]
    before = [task.doc_to_text(d) for d in docs]
    _compile_templates_once()
    compiled = []
    real = utils.env.from_string
    utils.env.from_string = lambda source: compiled.append(source) or real(source)
    try:
        after = [task.doc_to_text(d) for d in docs] + [task.doc_to_text(d) for d in docs]
    finally:
        utils.env.from_string = real
    assert after == before * 2 and len(set(before)) == 3
    assert len(compiled) <= 1  # compiled once (or not at all: kept from an earlier evaluation in this process)
