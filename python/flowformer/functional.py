"""The typed functional API over torch.ops.flowformer.*. The math of each op is in spec/."""

from typing import Literal, Optional, Tuple

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


def causal_flow_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    feature_map: FeatureMap = "sigmoid",
    eps: float = 1e-6,
    clamp: float = 1.0,
    state: Optional[Tensor] = None,
    query_padding_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Causal Flow-Attention carrying its recurrent state, for decoding step by step.

    Same math and arguments as ``flow_attention(..., causal=True)``, plus ``state``: the state of the
    positions before this call, None for none. Returns ``(out, state)``, the state after the last
    position. Running a sequence in pieces, passing the state along, equals one causal run, and a call
    with L = 1 costs O(D M) per (batch, head), whatever the length of the history.

    The state is a (B, H, 3 + 4 D + D M) tensor in float32 (float64 for float64 inputs), per (b, h)
    [n, m, E, sum k, sum q, sum O k, sum I q, sum k (c v)^T (D x M, row-major)]: n the count of valid
    positions, the four D-vectors the prefix sums of spec/flow_attention.md, and the competition's
    normaliser sum exp(source) = E exp(m) held against its running maximum m. Padded positions (either
    mask) leave it unchanged.

    Packed sequences (``cu_seqlens``, int32 or int64 (N + 1,), the FlashAttention convention, as in
    ``causal_linear_attention``): B must be 1 and sequence n is positions [cu_seqlens[n], cu_seqlens[n + 1]);
    each runs alone from row n of ``state`` ((N, H, 3 + 4 D + D M); None: the empty prefix), and the returned
    state has a row per sequence (an empty sequence passes its row through). cu_seqlens[0] = 0, the offsets
    never decrease, the last is L. Each sequence is its own call of the op (views, no copies): fine for a
    few long sequences; many short ones pay a call each.

    Differentiable in query, key, value and ``state`` (a hand-written backward,
    ``causal_flow_attention_backward``), through ``out`` and the returned state: a sequence trained in pieces
    carrying the state, or split across processes, gets the gradients of one run. The count n gets no
    gradient (it is an integer), nor does m where a source equals it.
    """
    return torch.ops.flowformer.causal_flow_attention(
        query, key, value, feature_map=feature_map, eps=eps, clamp=clamp, state=state,
        query_padding_mask=query_padding_mask, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens)


def causal_linear_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    feature_map: FeatureMap = "elu1",
    normalize: bool = True,
    eps: float = 1e-6,
    initial_kv: Optional[Tensor] = None,
    initial_z: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Causal linear attention (Katharopoulos et al., "Transformers are RNNs", ICML 2020) with its
    recurrent state in and out: S_t = S_0 + sum_{j<=t} phi(k_j) v_j^T, z_t = z_0 + sum_{j<=t} phi(k_j),
    out_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps).

    Args:
        query, key: (B, H, L, D).
        value: (B, H, L, M).
        feature_map: phi: "elu1" (elu + 1, the paper's), "relu", "sigmoid" or "identity".
        normalize: divide by phi(q_t)^T z_t + eps; False gives the plain causal dot product.
        eps: added to the normaliser.
        initial_kv: (B, H, D, M) state S_0, float32 (float64 for float64 inputs); None means zeros.
        initial_z: (B, H, D) state z_0; None means zeros.
        cu_seqlens: packed sequences (the FlashAttention convention): int32 or int64 (N + 1,) offsets
            0 = cu_seqlens[0] <= ... <= cu_seqlens[N] = L, on the device of ``query`` or on the CPU (a
            CPU one spares the CUDA backend a device-to-host copy). Then B must be 1 and sequence n is
            positions [cu_seqlens[n], cu_seqlens[n + 1]) of the length axis, an independent causal run
            from its own state: initial_kv, initial_z, final_kv and final_z are (N, H, D, M) and
            (N, H, D). Empty sequences are allowed (they return their initial state). The results,
            gradients included, equal running each sequence alone. Not differentiable.

    Passing ``final_kv, final_z`` of one call as ``initial_kv, initial_z`` of the next continues the
    sequence exactly (gradients included); a call with L = 1 is one decoding step, O(D M) per head.
    Any strides are accepted; dtypes float32, float16, bfloat16 and float64, with float32 accumulation.

    Returns:
        (out (B, H, L, M) in the dtype of ``query``, final_kv (B, H, D, M), final_z (B, H, D)), with N
        in place of B in the states when ``cu_seqlens`` is given. Differentiable in query, key, value
        and the initial states.
    """
    return torch.ops.flowformer.causal_linear_attention(
        query, key, value, feature_map=feature_map, normalize=normalize, eps=eps, initial_kv=initial_kv,
        initial_z=initial_z, cu_seqlens=cu_seqlens)


def linear_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    feature_map: FeatureMap = "elu1",
    eps: float = 1e-6,
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """Non-causal linear attention: out_i = phi(q_i)^T S / (phi(q_i)^T z + eps) with
    S = sum_j phi(k_j) v_j^T and z = sum_j phi(k_j) over the valid keys.

    Args:
        query: (B, H, L, D).
        key: (B, H, S, D).
        value: (B, H, S, M).
        feature_map: phi: "elu1" (default), "relu", "sigmoid" or "identity".
        eps: added to the normaliser.
        key_padding_mask: bool (B, S), True marks a padded key (left out of S and z).

    Returns:
        (B, H, L, M) in the dtype of ``query``. Differentiable in query, key and value.
    """
    return torch.ops.flowformer.linear_attention(
        query, key, value, feature_map=feature_map, eps=eps, key_padding_mask=key_padding_mask)


def aft_full(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    pos_bias: Tensor,
    *,
    causal: bool = False,
    window: int = 0,
) -> Tensor:
    """AFT-full and AFT-local (Zhai et al., "An Attention Free Transformer", 2021):
    out_t = sigmoid(q_t) * sum_t' softmax_t'(k_t' + w_{t,t'}) v_t', per channel.

    Args:
        query: (B, L, C).
        key, value: (B, S, C).
        pos_bias: (L, S) learned position biases w, shared by batch and channels.
        causal: sum over t' <= t only (needs L == S).
        window: 0 for AFT-full; s > 0 for AFT-local: the bias applies where |t - t'| < s and is 0 (not
            -inf: those positions still contribute) elsewhere; O(L s C) work.

    Exact and finite for keys anywhere in [-80, 80] and biases in [-30, 30] (maxima are subtracted;
    where the fast factorised sums underflow, causal inputs are first refactorised in blocks of 32 rows
    (keys rising along the sequence), and the elements that still underflow are recomputed exactly, at
    O(S) each: inputs that make most elements underflow even so run many times slower). Any strides;
    float32, float16, bfloat16, float64, accumulated in float32 (float64 for float64). For the backward
    it keeps two (B, L, C) softmax statistics besides its inputs; window > 0 needs no (L, S) work space.

    Returns:
        (B, L, C) in the dtype of ``query``. Differentiable in query, key, value and pos_bias.
    """
    return torch.ops.flowformer.aft_full(query, key, value, pos_bias, causal=causal, window=window)


def aft_simple(query: Tensor, key: Tensor, value: Tensor, *, causal: bool = False) -> Tensor:
    """AFT-simple: out_t = sigmoid(q_t) * sum_t' softmax_t'(k_t') v_t', per channel (no position bias);
    causal: a running recurrence over t' <= t with a running maximum (never overflows).

    Args:
        query: (B, L, C).
        key, value: (B, S, C) (S == L when causal).

    Returns:
        (B, L, C) in the dtype of ``query``. Differentiable in query, key and value.
    """
    return torch.ops.flowformer.aft_simple(query, key, value, causal=causal)


def aft_conv(query: Tensor, key: Tensor, value: Tensor, weight: Tensor) -> Tensor:
    """AFT-conv: AFT-local on an image grid with a per-head, weight-shared relative position bias.

    Args:
        query, key, value: (B, Hi, Wi, C) image tokens, channels last.
        weight: (heads, s, s), s odd; C must be divisible by heads; head h owns the h-th contiguous
            block of C / heads channels. For the position p' = p + (dy, dx) inside the s x s
            neighbourhood of p the bias is weight[h, dy + s // 2, dx + s // 2]; every other position
            contributes with bias 0 (zero padding at the borders).

    out_p = sigmoid(q_p) * (sum_all exp(k) v + sum_{N(p)} (exp(w) - 1) exp(k) v) / (same without v),
    in O(Hi Wi s^2 C), exact and finite under the spec's ranges (maxima subtracted, exact fallback).

    Returns:
        (B, Hi, Wi, C) in the dtype of ``query``. Differentiable in query, key, value and weight.
    """
    return torch.ops.flowformer.aft_conv(query, key, value, weight)


__all__ = ["flow_attention", "causal_flow_attention", "causal_linear_attention", "linear_attention", "aft_full",
           "aft_simple", "aft_conv"]
