import random

import pytest
import torch
from conftest import chat_rows, make_tokenizer, text_rows, write_jsonl
from transformers import AutoModelForCausalLM

from finetune import attention
from finetune.data import (IGNORE, Collator, DataError, RowDataset, block_causal_mask, build_datasets, encode_dataset,
                           encode_weighted, pack, DataStats)
from finetune.model import load_model
from finetune.recipe import DataSection, DatasetSpec, ModelSection
from finetune.loss import token_loss_sum


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


def test_an_assistant_turn_with_weight_0_is_context_and_bad_weights_are_named(tmp_path, tokenizer):
    turns = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "one two", "weight": 0},
             {"role": "user", "content": "again"}, {"role": "assistant", "content": "three", "weight": 1}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": turns}])
    ds = encode_dataset(DatasetSpec(path=str(path), format="chat"), tokenizer, _data(path), DataStats())
    assert _target_text(tokenizer, ds[0]["input_ids"], ds[0]["target"]) == "three<|im_end|>\n"
    assert "one two" in tokenizer.decode(ds[0]["input_ids"])  # still in the conversation, as context
    bad = [{"messages": [{"role": "user", "content": "a", "weight": 0}, {"role": "assistant", "content": "b"}]},
           {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0.5}]},
           {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]}]
    path = write_jsonl(tmp_path / "bad.jsonl", bad)
    with pytest.raises(DataError, match=r"bad\.jsonl: 3 bad row\(s\).*row 0: `messages\[0\]\.weight` must be 0 or "
                                        r"1, on an assistant turn.*row 1: `messages\[1\]\.weight`.*row 2: `messages` "
                                        r"has no assistant turn to learn \(every one has weight 0\)"):
        build_datasets(_data(path), tokenizer, seed=0)


def test_a_datasets_system_message_comes_first_in_each_row_and_is_never_a_target(tmp_path, tokenizer):
    rows = chat_rows(3)
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    spec = DatasetSpec(path=str(path), format="chat", system="sort into bins")
    ds = encode_dataset(spec, tokenizer, _data(path), DataStats())
    plain = encode_dataset(DatasetSpec(path=str(path), format="chat"), tokenizer, _data(path), DataStats())
    for with_system, without in zip(ds, plain):
        text = tokenizer.decode(with_system["input_ids"])
        assert text.startswith("<|im_start|>system\nsort into bins<|im_end|>\n")
        assert text.endswith(tokenizer.decode(without["input_ids"]))  # the row itself, unchanged after it
        assert _target_text(tokenizer, with_system["input_ids"], with_system["target"]) == \
            _target_text(tokenizer, without["input_ids"], without["target"])
    rows[1]["messages"].insert(0, {"role": "system", "content": "its own"})
    path = write_jsonl(tmp_path / "own.jsonl", rows)
    with pytest.raises(DataError, match=r"own\.jsonl: 1 bad row\(s\).*row 1: the row has a system message of its own"):
        build_datasets(DataSection(train=[DatasetSpec(path=str(path), format="chat", system="x")]), tokenizer, seed=0)


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


def test_replay_kl_and_fisher_data_take_each_datasets_weight_as_training_data_does(tmp_path, tokenizer):
    from finetune.mitigations.replay import mix
    from finetune.recipe import ReplaySection, TrainSection

    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"apple {i}"} for i in range(6)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"banana {i}"} for i in range(4)])
    specs = [DatasetSpec(path=str(a), format="text", weight=0.5), DatasetSpec(path=str(b), format="text", weight=3)]
    data = DataSection(train=specs)
    mixed = encode_weighted(specs, tokenizer, data, DataStats(), seed=0)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in mixed["input_ids"]]
    assert sum(t.startswith("apple") for t in texts) == 3 and sum(t.startswith("banana") for t in texts) == 12
    assert all(texts.count(f"banana {i}") == 3 for i in range(4))
    # Replay draws from the weighted pool: at a ratio whose tokens exceed the pool, every pooled example comes once.
    recipe = type("Recipe", (), {"data": DataSection(train=specs, replay=ReplaySection(datasets=specs, ratio=0.99)),
                                 "train": TrainSection()})()
    train = encode_weighted(specs[:1], tokenizer, data, DataStats(), seed=0)
    replayed = mix(recipe, train, tokenizer, DataStats())
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in replayed["input_ids"]]
    assert sum(t.startswith("banana") for t in texts) > 3 * sum(t.startswith("apple") for t in texts)


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


N = IGNORE  # no label
# Three examples, every token a target but the second token of B. B's first token is a target, so a label shifted
# across the boundary (the last token of A predicting it) would count.
A, B, C = ([10, 11, 12], [1, 1, 1]), ([20, 21, 22, 23], [1, 0, 1, 1]), ([30, 31], [1, 1])
# Label at t: token t+1 of the same example if it is a target; positions restart at 0 with every example.
PER_EXAMPLE = {"A": ([11, 12, N], [0, 1, 2]), "B": ([N, 22, 23, N], [0, 1, 2, 3]), "C": ([31, N], [0, 1])}
LAYOUTS = {  # rows of examples each collator mode makes from rows [[A, B], [C]] (unpacked: [[A], [B], [C]])
    "segments": [["A", "B", "C"]], "block_bool": [["A", "B"], ["C"]], "block_float": [["A", "B"], ["C"]],
    "position_ids": [["A", "B"], ["C"]], "padding": [["A"], ["B"], ["C"]],
}


@pytest.mark.parametrize("mask", LAYOUTS)
def test_labels_and_position_ids_restart_at_every_example_boundary(mask):
    rows = [[A], [B], [C]] if mask == "padding" else [[A, B], [C]]
    batch = Collator(pad_id=0, mask=mask)(rows)
    width = max(sum(len(PER_EXAMPLE[name][0]) for name in row) for row in LAYOUTS[mask])
    labels, positions = [], []
    for row in LAYOUTS[mask]:
        pad = width - sum(len(PER_EXAMPLE[name][0]) for name in row)
        labels.append([t for name in row for t in PER_EXAMPLE[name][0]] + [N] * pad)
        positions.append([t for name in row for t in PER_EXAMPLE[name][1]] + [0] * pad)
    assert batch["labels"].tolist() == labels
    assert batch["position_ids"].tolist() == positions
    assert int(batch["n_tokens"]) == 9
    if mask == "segments":
        assert batch["segment_lengths"] == (3, 4, 2)


# The attention finetune trains with (its per-example sdpa), and the block masks sdpa and eager take.
PACKED_ATTENTION = {attention.NAME: "segments", "sdpa": "block_bool", "eager": "block_float"}


@pytest.mark.parametrize("attn", PACKED_ATTENTION)
@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gpt2"])
def test_packed_and_unpacked_batches_give_the_same_loss_and_gradients(tmp_path, tiny_models, tokenizer, arch, attn):
    """Through finetune's attention and loss. Chat and text examples (in text, the first token of every example is a
    target: a label shifted across an example boundary shows); GPT-2's learned absolute positions show position ids
    that fail to restart, which rotary models cannot."""
    chat = write_jsonl(tmp_path / "c.jsonl", chat_rows(6))
    text = write_jsonl(tmp_path / "t.jsonl", text_rows(6))
    data = DataSection(train=[DatasetSpec(path=str(chat), format="chat"), DatasetSpec(path=str(text), format="text")],
                       max_length=64)
    examples, _, _ = build_datasets(data, tokenizer, seed=0)
    if attn == attention.NAME:  # as training loads it (llama's kv heads are fewer than its heads: grouped-query)
        model = load_model(ModelSection(path=str(tiny_models[arch])), None)
        assert model.config._attn_implementation == attn
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], attn_implementation=attn)
    model.eval()

    def loss_and_gradients(rows, mask):
        batch = Collator(tokenizer.eos_token_id, mask)([rows[i] for i in range(len(rows))])
        batch.pop("n_tokens")
        model.zero_grad()
        targets = (batch["labels"] != IGNORE).sum()
        loss = token_loss_sum(model, batch) / targets
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    packed = RowDataset(examples, 64, packing=True)
    assert max(len(r) for r in packed.rows) > 1  # the test means nothing unless rows really hold several examples
    loss, grads = loss_and_gradients(packed, PACKED_ATTENTION[attn])
    expected_loss, expected = loss_and_gradients(RowDataset(examples, 64, packing=False), "padding")
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    for name, grad in grads.items():
        assert torch.allclose(grad, expected[name], rtol=1e-4, atol=1e-6), (name, (grad - expected[name]).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_evaluation_passes_give_sdpa_the_grouped_heads_and_transformers_numbers(tiny_models, monkeypatch,
                                                                                      dtype):
    """Without autograd, a masked pass hands sdpa the key/value heads grouped (not repeated), with the same numbers
    as transformers' sdpa path; with autograd, transformers' own path runs."""
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = load_model(ModelSection(path=str(tiny_models["llama"])), None)
    module = model.model.layers[0].self_attn
    assert module.num_key_value_groups > 1
    torch.manual_seed(0)
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    query = torch.randn(3, heads, 5, 16, dtype=dtype)
    key, value = (torch.randn(3, kv, 9, 16, dtype=dtype) for _ in range(2))
    mask = torch.rand(3, 1, 5, 9) > 0.4
    mask[..., 0] = True  # every query sees something
    keys_seen, real = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, *a, **kw: keys_seen.append(k.shape[1])
                        or real(q, k, *a, **kw))
    with torch.no_grad():
        ours, _ = attention.segment_sdpa_forward(module, query, key, value, mask, scaling=0.25)
        theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert keys_seen == [kv, heads]  # grouped for ours, repeated by transformers
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-2)
    assert ours.shape == (3, 5, heads, 16)
    keys_seen.clear()
    attention.segment_sdpa_forward(module, query.requires_grad_(), key, value, mask, scaling=0.25)
    assert keys_seen == [heads]


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
