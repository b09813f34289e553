"""Attention for packed batches without a block mask: each example gets its own causal sdpa call.

With `model.attn_implementation: sdpa` and packing, the collator lays a micro-batch out as one row of real tokens
(no padding at all) and passes `segment_lengths`, the length of each example in order. A 4D block-diagonal mask
would make sdpa compute every pair of positions in a row and then discard those across examples (and, on CPU,
repeat the key/value heads, since the kernels take grouped-query attention only without a mask); per example, the
work is the sum of squared lengths instead of rows times max_length squared. Measured on SmolLM2-135M's shapes
(fp32, one CPU thread, 8 packed rows of 256): 40 ms per layer for forward and backward instead of 60.

Everywhere else (evaluation, generation, a batch without `segment_lengths`) the model runs transformers' own sdpa,
but that a masked pass on the CPU without autograd hands sdpa the grouped key/value heads as they are (the same
numbers without copying them). The implementation name stays out of saved configs (transformers does not save it)."""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "finetune_sdpa"


def segment_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         segment_lengths: tuple[int, ...] | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [1, heads, tokens, dim], key/value [1, kv_heads, tokens, dim] -> ([1, tokens, heads, dim], None)."""
    if segment_lengths is None:
        if dropout == 0.0 and _gqa_with_mask_on_cpu(query, key, attention_mask, kwargs):
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                                   scale=scaling, enable_gqa=True)
            return out.transpose(1, 2).contiguous(), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1 or sum(segment_lengths) != query.shape[2]:
        raise ValueError(f"segment_lengths (sum {sum(segment_lengths)}) must cover a single row of "
                         f"{query.shape[2]} tokens; got a batch of shape {tuple(query.shape)}")
    gqa = query.shape[1] != key.shape[1]
    # split, not slicing: the backward of split concatenates, while each slice's backward adds into a zeroed
    # gradient of the whole row (28% of the time in the measurement above).
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                                         enable_gqa=gqa)
        for q, k, v in zip(query.split(segment_lengths, 2), key.split(segment_lengths, 2),
                           value.split(segment_lengths, 2))
    ]
    return torch.cat(outputs, 2).transpose(1, 2).contiguous(), None


def _gqa_with_mask_on_cpu(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                          kwargs: dict) -> bool:
    """Whether sdpa can take grouped-query attention with a mask as it is: transformers repeats the key/value heads
    wherever a mask is given (CUDA's kernels need that), but torch's CPU kernel takes them grouped, with the same
    result to the bit. At a multiple-choice batch's shapes (SmolLM2-135M, bf16, 2 CPU cores) the call took 18-21 ms
    instead of 24-31. Not under autograd (training keeps transformers' path), nor for one query (transformers packs
    the heads itself there), a position bias or a soft-cap."""
    return (attention_mask is not None and query.device.type == "cpu" and query.shape[1] != key.shape[1]
            and query.shape[2] > 1 and not torch.is_grad_enabled()
            and not any(kwargs.get(k) is not None for k in ("position_bias", "softcap"))
            and not kwargs.get("output_attentions", False))


def register() -> str:
    """Make NAME a valid `attn_implementation` (masks as sdpa's); returns it."""
    AttentionInterface.register(NAME, segment_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
