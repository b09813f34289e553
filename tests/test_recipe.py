import subprocess
import sys

import pytest
from conftest import write_recipe

from finetune.recipe import RecipeError, changed_keys, describe_keys, load_recipe, recipe_to_dict


@pytest.fixture
def base(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hi"}\n')
    model = tmp_path / "m"
    model.mkdir()
    return {"model": {"path": str(model)}, "data": {"train": [{"path": str(data)}]}}


def _load(tmp_path, recipe, overrides=()):
    return load_recipe(write_recipe(tmp_path / "r.yaml", recipe), list(overrides))


def test_defaults_fill_missing_sections_and_output_dir_follows_the_file_name(tmp_path, base):
    r = _load(tmp_path, base)
    assert r.train.lr == 2e-4 and r.lora is None and r.data.packing and r.output.dir == "runs/r"


def test_unknown_key_names_file_key_and_closest_valid_key(tmp_path, base):
    base["train"] = {"learning_rate": 1e-4}
    with pytest.raises(RecipeError, match=r"r\.yaml: unknown key `train\.learning_rate`.*") as e:
        _load(tmp_path, base)
    base["train"] = {"lrr": 1e-4}
    with pytest.raises(RecipeError, match=r"unknown key `train\.lrr`\. Did you mean `train\.lr`\?"):
        _load(tmp_path, base)
    base.pop("train")
    base["lora"] = {"rank": 8}
    with pytest.raises(RecipeError, match=r"`lora\.rank`\. Did you mean `lora\.r`"):
        _load(tmp_path, base)
    assert "Valid keys" in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("train.lr=0", r"`train\.lr` is 0; it must be a number > 0"),
    ("train.lr=-1e-4", r"`train\.lr`.*> 0"),
    ("train.batch_size=0", r"`train\.batch_size` is 0; it must be a number > 0"),
    ("train.batch_size=2.5", r"`train\.batch_size` is 2\.5; it must be an integer"),
    ("lora.r=0", r"`lora\.r` is 0"),
    ("lora.dropout=1.5", r"`lora\.dropout`.*\[0, 1\)"),
    ("train.schedule=cosin", r"`train\.schedule` is 'cosin'; it must be one of 'cosine', 'linear', 'constant'"),
    ("data.packing=yes please", r"`data\.packing`.*true or false"),
    ("data.train=[{path: missing.jsonl}]", r"`data\.train\[0\]\.path`: file missing\.jsonl does not exist"),
    ("model.path=./nowhere", r"`model\.path` \./nowhere does not exist"),
    ("data.train=[]", r"`data\.train` is empty"),
    ("train=5", r"`train` is 5; it must be a mapping"),
])
def test_bad_values_name_the_key_and_what_is_allowed(tmp_path, base, override, message):
    with pytest.raises(RecipeError, match=message):
        _load(tmp_path, base, [override])


def test_overrides_set_keys_turn_lora_on_and_off_and_parse_numbers(tmp_path, base):
    r = _load(tmp_path, base, ["train.lr=1e-4", "lora.r=8", "train.max_steps=7"])
    assert r.train.lr == 1e-4 and r.lora.r == 8 and r.lora.alpha == 32 and r.train.max_steps == 7
    base["lora"] = {"r": 4}
    assert _load(tmp_path, base).lora.r == 4
    assert _load(tmp_path, base, ["lora=null"]).lora is None
    with pytest.raises(RecipeError, match="must look like section.key=value"):
        _load(tmp_path, base, ["train.lr"])


def test_malformed_yaml_and_non_mapping_are_explained(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: x\ntrain: [")
    with pytest.raises(RecipeError, match=r"bad\.yaml is not valid YAML at line \d+"):
        load_recipe(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(RecipeError, match="must be a mapping of sections"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_yaml_tags_that_would_run_code_are_refused(tmp_path):
    bad = tmp_path / "evil.yaml"
    bad.write_text("model: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    assert not (tmp_path / "pwned").exists()


def test_changed_keys_ignore_bookkeeping_but_catch_result_keys(tmp_path, base):
    a = recipe_to_dict(_load(tmp_path, base))
    b = recipe_to_dict(_load(tmp_path, base, ["output.keep=9", "train.log_every=5"]))
    c = recipe_to_dict(_load(tmp_path, base, ["train.lr=1e-3", "lora.r=8"]))
    assert changed_keys(a, b) == []
    assert set(changed_keys(a, c)) >= {"train.lr", "lora.r"}
    # A run saved before a key existed was made the default's way: the key at its default is no change.
    older = {**a, "eval": {k: v for k, v in a["eval"].items() if k != "mixed_precision"}}
    assert changed_keys(older, a) == []
    assert changed_keys(older, recipe_to_dict(_load(tmp_path, base, ["eval.mixed_precision=bf16"]))) == \
        ["eval.mixed_precision"]


def test_every_key_is_documented_with_its_default():
    text = describe_keys()
    for key in ("lr: 0.0002", "batch_size: 8", "packing: true", "r: 16", "max_drop: 0.02", "save_every: 50"):
        assert key in text


# `python -m finetune`, then which heavy libraries the process had imported by the time it exited.
HEAVY_IMPORTS_AT_EXIT = """import atexit, runpy, sys
heavy = ("torch", "transformers", "accelerate", "peft", "datasets", "lm_eval")
atexit.register(lambda: print("imported:", sorted(m for m in heavy if m in sys.modules), file=sys.stderr))
sys.argv = ["finetune", *sys.argv[1:]]
runpy.run_module("finetune", run_name="__main__")
"""


def test_cli_rejects_a_misspelled_key_before_loading_anything_without_traceback(tmp_path, base):
    base["train"] = {"bach_size": 4}
    path = write_recipe(tmp_path / "typo.yaml", base)
    proc = subprocess.run([sys.executable, "-c", HEAVY_IMPORTS_AT_EXIT, "train", str(path)], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert "unknown key `train.bach_size`. Did you mean `train.batch_size`?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "imported: []" in proc.stderr  # the mistake is reported before torch and friends load (seconds of start-up)


def test_shipped_recipes_validate(monkeypatch):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # recipes name data/ relative to the repository root, where users run them
    recipes = sorted((root / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        load_recipe(path)


def test_a_system_message_is_for_chat_datasets_only(tmp_path, base):
    base["data"]["train"][0]["system"] = "sort into bins"
    with pytest.raises(RecipeError, match=r"`data\.train\[0\]\.system` is a system message for chat rows; this "
                                          r"dataset's format is `text`"):
        _load(tmp_path, base)
    assert _load(tmp_path, base, ["data.train=[{path: " + base["data"]["train"][0]["path"] +
                                  ", format: chat, system: sort into bins}]"]).data.train[0].system == "sort into bins"
