"""Property-based tests: whatever a user writes in a recipe or a dataset, the answer is a result or a clear
one-paragraph error (exit 2, no traceback), never a crash."""

import json

import yaml
from conftest import make_tokenizer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from finetune.cli import main as cli_main
from finetune.data import DataError, build_datasets
from finetune.recipe import RecipeError, load_recipe
from finetune.recipe import DataSection, DatasetSpec

# No deadline and no too_slow health check: both are wall-clock limits, which fail on busy shared cores.
UNTIMED = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]

KEYS = {
    "model": ["path", "dtype", "trust_remote_code", "attn_implementation", "gradient_checkpointing", "pth"],
    "data": ["train", "max_length", "packing", "train_on", "val_fraction", "on_bad_row", "maxlength"],
    "train": ["lr", "max_steps", "batch_size", "grad_accum", "seed", "schedule", "betas", "learning_rate"],
    "lora": ["r", "alpha", "dropout", "target_modules", "use_dora", "rank", "first_layer"],
    "eval": ["tasks", "max_drop"],
    "output": ["dir", "save_every", "keep"],
    "bogus": ["x"],
}
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["cosine", "bfloat16", "chat", "1e-4", "all-linear"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


@st.composite
def recipes(draw):
    recipe = {}
    for section in draw(st.lists(st.sampled_from(sorted(KEYS)), unique=True, max_size=7)):
        if draw(st.booleans()):
            recipe[section] = draw(values)
        else:
            keys = draw(st.lists(st.sampled_from(KEYS[section]), unique=True, max_size=4))
            recipe[section] = {k: draw(values) for k in keys}
    return recipe


@settings(max_examples=300, deadline=None, suppress_health_check=UNTIMED)
@given(recipe=recipes(), overrides=st.lists(st.text(max_size=15), max_size=2))
@example(recipe={"data": {"\n": None}}, overrides=[])  # found by a fresh search: a key's newline split the message
def test_any_recipe_loads_or_raises_a_recipe_error(tmp_path, recipe, overrides):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(recipe))
    try:
        load_recipe(path, overrides)
    except RecipeError as e:
        assert str(e) and "\n" not in str(e).strip()


@settings(max_examples=150, deadline=None, suppress_health_check=UNTIMED)
@given(text=st.text(max_size=200))
def test_any_text_as_a_recipe_file_gives_exit_0_or_2_without_traceback(tmp_path, capsys, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    assert cli_main(["check", str(path)]) in (0, 2)
    assert "Traceback" not in capsys.readouterr().err


@settings(max_examples=50, deadline=None, suppress_health_check=UNTIMED)
@given(raw=st.binary(min_size=1, max_size=200))
def test_any_bytes_as_a_recipe_file_are_refused_cleanly(tmp_path, raw):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(raw)
    try:
        load_recipe(path)
    except RecipeError:
        pass


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=30)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.sampled_from(["role", "content", "x"]), inner,
                                                                   max_size=3)),
                           max_leaves=8)
FIELDS = {"text": ["text"], "instruction": ["instruction", "input", "output"], "chat": ["messages"]}
TOKENIZER = make_tokenizer()


@settings(max_examples=60, deadline=None, suppress_health_check=UNTIMED)
@given(fmt=st.sampled_from(sorted(FIELDS)), data=st.data())
def test_any_rows_encode_or_raise_a_data_error_naming_file_and_row(tmp_path, fmt, data):
    rows = data.draw(st.lists(st.fixed_dictionaries({}, optional={f: json_values for f in FIELDS[fmt]}),
                              min_size=1, max_size=6))
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for on_bad_row in ("fail", "skip"):
        section = DataSection(train=[DatasetSpec(path=str(path), format=fmt)], max_length=32, on_bad_row=on_bad_row)
        try:
            train, _, stats = build_datasets(section, TOKENIZER, seed=0)
        except DataError as e:
            assert str(path) in str(e)
        else:
            assert len(train) + stats.skipped == len(rows)
            assert all(len(ids) <= 32 for ids in train["input_ids"])


def test_invalid_utf8_and_non_json_files_are_data_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9"}\n')
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    for path in (bad, broken):
        section = DataSection(train=[DatasetSpec(path=str(path), format="text")])
        try:
            build_datasets(section, TOKENIZER, seed=0)
        except DataError as e:
            assert str(path) in str(e)
        else:
            raise AssertionError(f"{path.name} was accepted")
