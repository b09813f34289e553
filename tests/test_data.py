import random

import pytest
import torch
from conftest import chat_rows, make_tokenizer, write_jsonl
from transformers import AutoModelForCausalLM

from finetune import attention
from finetune.data import (IGNORE, Collator, DataError, RowDataset, block_causal_mask, build_datasets, encode_dataset,
                           pack, DataStats)
from finetune.model import load_model
from finetune.recipe import DataSection, DatasetSpec, ModelSection


def _data(path, fmt="chat", **kw) -> DataSection:
    return DataSection(train=[DatasetSpec(path=str(path), format=fmt)], **kw)


def _target_text(tokenizer, ids, target):
    return tokenizer.decode([t for t, m in zip(ids, target) if m])


def test_chat_targets_are_the_assistant_turns_only(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                          {"role": "assistant", "content": "one two"}, {"role": "user", "content": "again"},
                          {"role": "assistant", "content": "three"}]}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    ds = encode_dataset(DatasetSpec(path=str(path), format="chat"), tokenizer, _data(path), DataStats())
    ids, target = ds[0]["input_ids"], ds[0]["target"]
    assert _target_text(tokenizer, ids, target) == "one two<|im_end|>\nthree<|im_end|>\n"
    # Everything else, prompts and role headers included, is context only.
    context = tokenizer.decode([t for t, m in zip(ids, target) if not m])
    assert "hello" in context and "again" in context and "be brief" in context and "one" not in context


def test_train_on_all_makes_every_token_a_target(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(2))
    ds = encode_dataset(DatasetSpec(path=str(path), format="chat"), tokenizer, _data(path, train_on="all"),
                        DataStats())
    assert all(ds[0]["target"])


def test_instruction_format_with_column_mapping_and_without_chat_template(tmp_path):
    tok = make_tokenizer()
    rows = [{"q": "name a colour", "ctx": "of the sky", "a": "blue"}]
    path = write_jsonl(tmp_path / "i.jsonl", rows)
    spec = DatasetSpec(path=str(path), format="instruction", columns={"instruction": "q", "input": "ctx", "output": "a"})
    with_template = encode_dataset(spec, tok, _data(path, "instruction"), DataStats())[0]
    assert _target_text(tok, with_template["input_ids"], with_template["target"]) == "blue<|im_end|>\n"
    assert "of the sky" in tok.decode(with_template["input_ids"])
    tok.chat_template = None  # a base model: the Alpaca layout, response then EOS
    plain = encode_dataset(spec, tok, _data(path, "instruction"), DataStats())[0]
    assert _target_text(tok, plain["input_ids"], plain["target"]) == "blue<|endoftext|>"
    assert tok.decode(plain["input_ids"]).startswith("### Instruction:\nname a colour\n\n### Input:\nof the sky")


def test_text_format_learns_every_token_and_ends_with_eos(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "the cat sat"}])
    ex = encode_dataset(DatasetSpec(path=str(path)), tokenizer, _data(path, "text"), DataStats())[0]
    assert all(ex["target"]) and ex["input_ids"][-1] == tokenizer.eos_token_id


def test_bad_rows_fail_naming_file_and_row_or_are_skipped_and_counted(tmp_path, tokenizer):
    rows = chat_rows(4)
    rows[2] = {"messages": [{"role": "user", "content": "no answer"}]}
    rows[3] = {"messages": "not a list"}
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad\.jsonl: 2 bad row\(s\).*row 2: .*no assistant turn.*on_bad_row"):
        build_datasets(_data(path), tokenizer, seed=0)
    train, _, stats = build_datasets(_data(path, on_bad_row="skip"), tokenizer, seed=0)
    assert len(train) == 2 and stats.skipped == 2 and "row 3" in stats.skipped_reasons[1]


def test_missing_column_and_empty_file_are_explained(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a"}])
    with pytest.raises(DataError, match=r"column\(s\) \['messages'\] missing.*columns:"):
        build_datasets(_data(path), tokenizer, seed=0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        build_datasets(_data(empty), tokenizer, seed=0)


def test_truncation_and_weights(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(10))
    data = DataSection(train=[DatasetSpec(path=str(path), format="chat", weight=2.5)], max_length=12,
                       train_on="all")
    train, _, stats = build_datasets(data, tokenizer, seed=0)
    assert len(train) == 25 and max(len(x) for x in train["input_ids"]) == 12 and stats.truncated == 10  # counted once per source row


def test_val_fraction_holds_out_distinct_examples(tmp_path, tokenizer):
    rows = [{"text": f"example number {i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    train, val, _ = build_datasets(_data(path, "text", val_fraction=0.25), tokenizer, seed=0)
    assert len(train) == 15 and len(val) == 5
    assert not {tuple(x) for x in train["input_ids"]} & {tuple(x) for x in val["input_ids"]}


def test_pack_keeps_every_example_once_within_max_length():
    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(500)]
    rows = pack(lengths, 64)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) <= sum(lengths) / 64 * 1.1  # close to the bound: little padding


def test_block_mask_separates_examples_and_is_causal():
    segment = torch.tensor([[0, 0, 1, 1, 1, -1]])
    m = block_causal_mask(segment, additive=False)[0, 0]
    assert m[1, 0] and not m[0, 1]  # causal inside example 0
    assert not m[2, 1] and m[4, 2]  # example 1 cannot see example 0
    assert m[5, 5] and not m[5, 4]  # padding sees only itself


@pytest.mark.parametrize("attn,mask", [("sdpa", "block_bool"), ("eager", "block_float"),
                                       (attention.NAME, "segments")])
def test_packed_and_unpacked_batches_give_the_same_per_example_loss(tmp_path, tiny_models, tokenizer, attn, mask):
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(6))
    examples, _, _ = build_datasets(_data(path), tokenizer, seed=0)
    if attn == attention.NAME:  # as training loads it (its kv heads are fewer than its heads: grouped-query)
        model = load_model(ModelSection(path=str(tiny_models["llama"])), None).eval()
        assert model.config._attn_implementation == attn
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], attn_implementation=attn).eval()
    pad = tokenizer.eos_token_id

    def per_example_losses(rows, mask):
        batch = Collator(pad, mask)([rows[i] for i in range(len(rows))])
        batch.pop("n_tokens")
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = model(**batch).logits
        token_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none",
                                                       ignore_index=IGNORE).view(labels.shape)
        # Group token losses by example: examples are laid out in order within each row ("segments": all of the
        # batch's examples in one row).
        layout = [[i for row in rows.rows for i in row]] if mask == "segments" else rows.rows
        assert len(layout) == labels.shape[0]
        out = []
        for b, row in enumerate(layout):
            start = 0
            for i in row:
                n = len(examples[i]["input_ids"])
                out.append((i, (token_loss[b, start:start + n].sum() / (labels[b, start:start + n] != IGNORE).sum())
                            .item()))
                start += n
        return dict(out)

    packed = RowDataset(examples, 64, packing=True)
    assert max(len(r) for r in packed.rows) > 1  # the test means nothing unless rows really hold several examples
    unpacked = RowDataset(examples, 64, packing=False)
    a = per_example_losses(packed, mask)
    b = per_example_losses(unpacked, "padding")
    assert a.keys() == b.keys()
    for i in a:
        assert abs(a[i] - b[i]) < 1e-4, (i, a[i], b[i])


def test_position_ids_alone_do_not_separate_packed_examples_under_sdpa(tmp_path, tiny_models, tokenizer):
    """Why the 4D mask exists: without it the second example's loss changes (guards against silently
    dropping the mask in favour of position ids on kernels that ignore them)."""
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(6))
    examples, _, _ = build_datasets(_data(path), tokenizer, seed=0)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    packed = RowDataset(examples, 64, packing=True)
    row = max(range(len(packed)), key=lambda i: len(packed.rows[i]))
    masked = Collator(tokenizer.eos_token_id, "block_bool")([packed[row]])
    loose = Collator(tokenizer.eos_token_id, "position_ids")([packed[row]])
    with torch.no_grad():
        a = model(input_ids=masked["input_ids"], position_ids=masked["position_ids"],
                  attention_mask=masked["attention_mask"]).logits
        b = model(input_ids=loose["input_ids"], position_ids=loose["position_ids"]).logits
    assert (a - b).abs().max() > 1e-3
