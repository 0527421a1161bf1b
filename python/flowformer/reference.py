"""Plain PyTorch implementations of the specs, written from their formulas, for tests and benchmarks.

They are eager einsum code in the style of the papers' public code (the causal Flow-Attention
reference materialises the (B, H, L, D, M) tensor exactly as the public code does), extended with
the padding masks of the spec. Not for production: use flowformer.functional.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def apply_feature_map(x: Tensor, name: str) -> Tensor:
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "elu1":
        return F.elu(x) + 1.0
    if name == "relu":
        return F.relu(x)
    if name == "identity":
        return x
    raise ValueError(f"unknown feature map {name!r}")


def _dot_eps(x: Tensor, y: Tensor, eps: float) -> Tensor:
    """<x + eps, y + eps> over the last dimension (y broadcasts)."""
    return ((x + eps) * (y + eps)).sum(-1)


def flow_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    causal: bool = False,
    feature_map: str = "sigmoid",
    eps: float = 1e-6,
    clamp: float = 1.0,
    query_padding_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """spec/flow_attention.md, computed in the dtype of the inputs."""
    q, k, qpad, kpad = _flow_features(query, key, feature_map, query_padding_mask, key_padding_mask)
    if causal:
        return _flow_causal(q, k, value, qpad | kpad, eps, clamp)
    return _flow_noncausal(q, k, value, qpad, kpad, eps, clamp)


def _flow_features(query, key, feature_map, query_padding_mask, key_padding_mask):
    """The features phi(query), phi(key) and both padding masks (all False where none is given)."""
    B, _, L, _ = query.shape
    S = key.shape[2]
    no_padding = torch.zeros(B, max(L, S), dtype=torch.bool, device=query.device)
    qpad = no_padding[:, :L] if query_padding_mask is None else query_padding_mask
    kpad = no_padding[:, :S] if key_padding_mask is None else key_padding_mask
    return apply_feature_map(query, feature_map), apply_feature_map(key, feature_map), qpad, kpad


def _flow_noncausal_factors(q, k, qpad, kpad, eps, clamp):
    """The per-position factors of non-causal Flow-Attention: out = g * (q k^T) (c v), masked rows zero.
    Returns (q, k) with padded rows zeroed, g (B, H, L), c (B, H, S) and the (B, 1, L, 1) output mask."""
    qvalid = (~qpad)[:, None, :, None].to(q.dtype)  # (B, 1, L, 1)
    kvalid = (~kpad)[:, None, :, None].to(q.dtype)
    q = q * qvalid
    k = k * kvalid
    n_q = qvalid.sum(2)  # (B, 1, 1): L_b
    n_k = kvalid.sum(2)
    # (1) incoming and outgoing flow
    sink_incoming = 1.0 / _dot_eps(q, k.sum(2, keepdim=True), eps)  # (B, H, L)
    source_outgoing = 1.0 / _dot_eps(k, q.sum(2, keepdim=True), eps)  # (B, H, S)
    # (2) conservation
    conserved_sink = _dot_eps(q, (k * source_outgoing[..., None]).sum(2, keepdim=True), eps)
    conserved_source = _dot_eps(k, (q * sink_incoming[..., None]).sum(2, keepdim=True), eps)
    conserved_source = torch.clamp(conserved_source, min=-clamp, max=clamp)
    # (3) competition and allocation, over valid positions with the valid counts
    safe_n_k = n_k.clamp(min=1)
    sink_allocation = torch.sigmoid(conserved_sink * (n_q / safe_n_k))
    logits = conserved_source.masked_fill(kpad[:, None, :], float("-inf"))
    all_padded = kpad.all(1)[:, None, None]
    logits = logits.masked_fill(all_padded, 0.0)
    source_competition = torch.softmax(logits, dim=-1) * safe_n_k
    empty = (n_q == 0) | (n_k == 0)  # (B, 1, 1)
    return q, k, sink_incoming * sink_allocation, source_competition, qvalid.bool() & ~empty[..., None]


def _flow_noncausal(q, k, v, qpad, kpad, eps, clamp):
    q, k, row_scale, competition, out_mask = _flow_noncausal_factors(q, k, qpad, kpad, eps, clamp)
    # (4) attention
    kv = k.transpose(-2, -1) @ (v * competition[..., None])
    out = (q @ kv) * row_scale[..., None]
    return torch.where(out_mask, out, torch.zeros_like(out))


def _flow_causal_factors(q, k, pad, eps, clamp):
    """The per-position factors of causal Flow-Attention: out_t = g_t sum_{j<=t} <q_t, k_j> c_j v_j.
    Returns (q, k) with padded rows zeroed, g (B, H, L), c (B, H, L) and the (B, 1, L, 1) valid mask."""
    valid = (~pad)[:, None, :, None].to(q.dtype)  # (B, 1, L, 1)
    q = q * valid
    k = k * valid
    n = valid.cumsum(2)[..., 0].clamp(min=1)  # (B, 1, L): valid positions up to t
    # (1) incoming and outgoing flow
    sink_incoming = n / _dot_eps(q, k.cumsum(2), eps)
    source_outgoing = n / _dot_eps(k, q.cumsum(2), eps)
    # (2) conservation
    conserved_sink = _dot_eps(q, (k * source_outgoing[..., None]).cumsum(2), eps) / n
    conserved_source = _dot_eps(k, (q * sink_incoming[..., None]).cumsum(2), eps) / n
    conserved_source = torch.clamp(conserved_source, min=-clamp, max=clamp)
    # (3) causal competition and allocation
    sink_allocation = torch.sigmoid(conserved_sink)
    e = torch.exp(conserved_source) * valid[..., 0]
    source_competition = e / e.cumsum(-1).clamp(min=torch.finfo(e.dtype).tiny) * n
    return q, k, sink_incoming / n * sink_allocation, source_competition, valid.bool()


def _flow_causal(q, k, v, pad, eps, clamp):
    q, k, row_scale, competition, valid = _flow_causal_factors(q, k, pad, eps, clamp)
    # (4) causal attention: the public code's (B, H, L, D, M) cumulative sum
    kv = torch.einsum("bhld,bhlm->bhldm", k, v * competition[..., None]).cumsum(2)
    out = torch.einsum("bhld,bhldm->bhlm", q * row_scale[..., None], kv)
    return out * valid


def flow_attention_weights(
    query: Tensor,
    key: Tensor,
    *,
    causal: bool = False,
    feature_map: str = "sigmoid",
    eps: float = 1e-6,
    clamp: float = 1.0,
    query_padding_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """The (B, H, L, S) matrix A that flow_attention applies to the values: out = A @ value, with
    A_ij = g_i <q_i, k_j> c_j (allocation times incoming flow, times competition), zero for masked
    pairs and, when causal, above the diagonal. O(L S) time and memory."""
    q, k, qpad, kpad = _flow_features(query, key, feature_map, query_padding_mask, key_padding_mask)
    if causal:
        q, k, row_scale, competition, rows = _flow_causal_factors(q, k, qpad | kpad, eps, clamp)
    else:
        q, k, row_scale, competition, rows = _flow_noncausal_factors(q, k, qpad, kpad, eps, clamp)
    weights = row_scale[..., None] * (q @ k.transpose(-2, -1)) * competition[..., None, :]
    if causal:
        weights = weights.tril()
    return torch.where(rows, weights, torch.zeros_like(weights))


def causal_linear_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    feature_map: str = "elu1",
    normalize: bool = True,
    eps: float = 1e-6,
    initial_kv: Optional[Tensor] = None,
    initial_z: Optional[Tensor] = None,
):
    """spec/linear_attention.md, causal: (out, final_kv, final_z), computed in the dtype of the inputs
    (states in that dtype too). Materialises the (B, H, L, D, M) prefix sums, as the paper's einsum code."""
    B, H, L, D = query.shape
    M = value.shape[-1]
    q = apply_feature_map(query, feature_map)
    k = apply_feature_map(key, feature_map)
    kv0 = query.new_zeros(B, H, D, M) if initial_kv is None else initial_kv.to(query.dtype)
    z0 = query.new_zeros(B, H, D) if initial_z is None else initial_z.to(query.dtype)
    kv = torch.einsum("bhld,bhlm->bhldm", k, value).cumsum(2) + kv0[:, :, None]
    z = k.cumsum(2) + z0[:, :, None]
    out = torch.einsum("bhld,bhldm->bhlm", q, kv)
    if normalize:
        out = out / (torch.einsum("bhld,bhld->bhl", q, z) + eps)[..., None]
    final_kv = kv[:, :, -1] if L > 0 else kv0
    final_z = z[:, :, -1] if L > 0 else z0
    return out, final_kv, final_z


def linear_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    feature_map: str = "elu1",
    eps: float = 1e-6,
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """spec/linear_attention.md, non-causal, over the valid keys."""
    q = apply_feature_map(query, feature_map)
    k = apply_feature_map(key, feature_map)
    v = value
    if key_padding_mask is not None:
        valid = (~key_padding_mask)[:, None, :, None].to(k.dtype)
        k, v = k * valid, v * valid
    kv = k.transpose(-2, -1) @ v
    z = k.sum(2)
    return (q @ kv) / (torch.einsum("bhld,bhd->bhl", q, z) + eps)[..., None]


def linear_attention_weights(
    query: Tensor,
    key: Tensor,
    *,
    causal: bool = False,
    feature_map: str = "elu1",
    eps: float = 1e-6,
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """The (B, H, L, S) matrix A that (causal_)linear_attention applies to the values (no initial
    state): A_ij = <q_i, k_j> / (sum_j' <q_i, k_j'> + eps) over valid (and, causal, j <= i) keys."""
    scores = apply_feature_map(query, feature_map) @ apply_feature_map(key, feature_map).transpose(-2, -1)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], 0.0)
    if causal:
        scores = scores.tril()
    return scores / (scores.sum(-1, keepdim=True) + eps)


def aft_full(query: Tensor, key: Tensor, value: Tensor, pos_bias: Tensor, *, causal: bool = False,
             window: int = 0) -> Tensor:
    """spec/aft.md, AFT-full (window = 0) and AFT-local (window > 0, bias 0 outside |t - t'| < window):
    a softmax over positions per channel of key + bias, as a (B, L, S, C) tensor (O(L S C) memory)."""
    L, S = pos_bias.shape
    bias = pos_bias.to(key.dtype)
    t = torch.arange(L, device=key.device)[:, None]
    j = torch.arange(S, device=key.device)[None, :]
    if window > 0:
        bias = torch.where((t - j).abs() < window, bias, torch.zeros_like(bias))
    logits = key[:, None, :, :] + bias[None, :, :, None]  # (B, L, S, C)
    if causal:
        logits = logits.masked_fill((j > t)[None, :, :, None], float("-inf"))
    weights = torch.softmax(logits, dim=2)
    return torch.sigmoid(query) * (weights * value[:, None]).sum(2)


def aft_full_matrix(query: Tensor, key: Tensor, value: Tensor, pos_bias: Tensor) -> Tensor:
    """AFT-full in the paper's matrix formulation, with the maxima subtracted:
    sigmoid(q) * (exp(w) @ (exp(k) v)) / (exp(w) @ exp(k)). O(L C) memory besides the (L, S) bias;
    underflows (0 / 0) where the two maxima do not meet: the eager peer of the benchmarks, not exact."""
    ew = torch.exp(pos_bias - pos_bias.amax(1, keepdim=True)).to(key.dtype)
    ek = torch.exp(key - key.amax(1, keepdim=True))
    return torch.sigmoid(query) * (ew @ (ek * value)) / (ew @ ek)


def aft_simple(query: Tensor, key: Tensor, value: Tensor, *, causal: bool = False) -> Tensor:
    """spec/aft.md, AFT-simple: a softmax over positions per channel of the keys, no position bias."""
    if causal:
        L = query.shape[1]
        return aft_full(query, key, value, key.new_zeros(L, L), causal=True)
    return torch.sigmoid(query) * (torch.softmax(key, dim=1) * value).sum(1, keepdim=True)


def aft_conv(query: Tensor, key: Tensor, value: Tensor, weight: Tensor) -> Tensor:
    """spec/aft.md, AFT-conv: AFT-local on the (Hi, Wi) grid with a per-head relative bias, as a dense
    softmax over all positions: p' = p + (dy, dx) within the s x s neighbourhood has bias
    weight[h, dy + s // 2, dx + s // 2], every other position bias 0. O((Hi Wi)^2 C) memory."""
    B, Hi, Wi, C = query.shape
    heads, s, _ = weight.shape
    r = s // 2
    ys, xs = torch.meshgrid(torch.arange(Hi), torch.arange(Wi), indexing="ij")
    ys, xs = ys.reshape(-1).to(key.device), xs.reshape(-1).to(key.device)
    dy, dx = ys[None, :] - ys[:, None], xs[None, :] - xs[:, None]  # (P, P): offset of p' from p
    inside = (dy.abs() <= r) & (dx.abs() <= r)
    index = ((dy + r).clamp(0, s - 1) * s + (dx + r).clamp(0, s - 1))
    bias = weight.reshape(heads, s * s).to(key.dtype)[:, index] * inside  # (heads, P, P)
    bias = bias.repeat_interleave(C // heads, dim=0).permute(1, 2, 0)  # (P, P, C)
    k = key.reshape(B, 1, Hi * Wi, C)
    weights = torch.softmax(k + bias[None], dim=2)  # (B, P, P', C)
    y = (weights * value.reshape(B, 1, Hi * Wi, C)).sum(2)
    return torch.sigmoid(query) * y.reshape(B, Hi, Wi, C)
