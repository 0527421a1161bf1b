"""The typed functional API over torch.ops.flowformer.*. The math of each op is in spec/."""

from typing import Literal, Optional

import torch
from torch import Tensor

FeatureMap = Literal["sigmoid", "elu1", "relu", "identity"]


def flow_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    causal: bool = False,
    feature_map: FeatureMap = "sigmoid",
    eps: float = 1e-6,
    clamp: float = 1.0,
    query_padding_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """Flow-Attention (Wu et al., "Flowformer", ICML 2022) in O((L + S) D M) time.

    Args:
        query: (B, H, L, D).
        key: (B, H, S, D).
        value: (B, H, S, M).
        causal: causal mode, one prefix scan with O(D M) state per (batch, head); needs L == S.
        feature_map: phi applied to queries and keys: "sigmoid" (the paper's), "elu1" (elu + 1),
            "relu", or "identity" (the inputs already are non-negative features).
        eps: added to both operands of every normaliser dot product.
        clamp: the conserved source is clamped to [-clamp, clamp] before the competition softmax
            (1 in the paper's code, 5 and 10 in its language and RL code; ``float("inf")`` disables it).
        query_padding_mask: bool (B, L), True marks a padded query.
        key_padding_mask: bool (B, S), True marks a padded key. Outputs at valid positions equal the
            outputs of the op run on the sequences with the padded positions removed; outputs at
            padded queries are 0. In causal mode a position is padding if either mask marks it.

    Any strides are accepted (e.g. a (B, L, H, D) tensor viewed with ``.transpose(1, 2)``); dtypes
    float32, float16, bfloat16 and float64, with float32 accumulation (float64 for float64).

    Returns:
        (B, H, L, M) in the dtype of ``query``. Differentiable in query, key and value.
    """
    return torch.ops.flowformer.flow_attention(
        query,
        key,
        value,
        causal=causal,
        feature_map=feature_map,
        eps=eps,
        clamp=clamp,
        query_padding_mask=query_padding_mask,
        key_padding_mask=key_padding_mask,
    )


__all__ = ["flow_attention"]
