"""Sequence parallelism on torch.distributed: a sequence too long for one device is split across the ranks of
a process group, each rank holding a contiguous slice (in rank order; slices may differ in length). Linear
attention is a sum over positions, so the ranks exchange only per-(batch, head) states, D x M numbers and D
more, never queries, keys or values: O(world B H D M) numbers per call (and as many in the backward),
whatever the length.

- Causal: each rank sums its slice's state S_r = sum_j phi(k_j) v_j^T, z_r = sum_j phi(k_j); the states are
  gathered and added in rank order (an exclusive scan: deterministic), and each rank runs the causal op from
  its incoming state. The backward sends the incoming states' gradients back the same way.
- Non-causal: the states of all ranks are gathered and added in rank order; every rank's queries read the
  total.

Flow-Attention (sequence_parallel_flow_attention) exchanges its prefix statistics the same way, in four
rounds, since each depends on the one before (spec/flow_attention.md): counts and the sums of q and k; the
sums of O k and I q; the competition's normaliser; the sum of k (c v)^T. Causal: they make the packed state of
causal_flow_attention, from which each rank runs its slice (gradients through the state included).

Every collective is an all_gather (gloo on CPU, NCCL on CUDA), its parts added in rank order, so every rank
computes the same bits, run after run. Every rank of the group must call the function (and its backward)
together. Results and gradients equal one run of the op on the whole sequence, up to the order of the sums.
"""

import contextlib
import math
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from flowformer import functional as F
from flowformer.reference import _dot_eps, apply_feature_map

__all__ = ["sequence_parallel_causal_linear_attention", "sequence_parallel_linear_attention",
           "sequence_parallel_flow_attention", "count_exchange"]


class ExchangeCount:
    """What the sequence-parallel functions exchanged while counting: collectives and bytes this rank sent
    (its tensor, once per all_gather)."""

    def __init__(self) -> None:
        self.collectives = 0
        self.bytes_sent = 0


_counters: List[ExchangeCount] = []


@contextlib.contextmanager
def count_exchange() -> Iterator[ExchangeCount]:
    """Counts the collectives of the sequence-parallel functions (forward and backward) run inside it."""
    counter = ExchangeCount()
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


def _all_gather(x: Tensor, group) -> List[Tensor]:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    for counter in _counters:
        counter.collectives += 1
        counter.bytes_sent += x.numel() * x.element_size()
    return parts


def _sum_in_order(parts: List[Tensor], like: Tensor) -> Tensor:
    total = torch.zeros_like(like)
    for part in parts:
        total = total + part
    return total


class _AllGather(torch.autograd.Function):
    """Every rank's x, stacked in rank order (world, *x.shape). The gradient of x_r is the sum over the ranks
    of their gradients of slot r, in rank order."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return torch.stack(_all_gather(x, group))

    @staticmethod
    def backward(ctx, grad: Tensor):
        rank = dist.get_rank(ctx.group)
        parts = _all_gather(grad, ctx.group)
        return _sum_in_order([part[rank] for part in parts], parts[0][rank]), None


class _RankSum(torch.autograd.Function):
    """The sum over the group's ranks of each rank's x, in rank order: of the ranks before this one
    (exclusive) or of all. The gradient of x_r is the sum of the output gradients of the ranks whose sums
    contain it (after r, or all)."""

    @staticmethod
    def forward(ctx, x: Tensor, group, exclusive: bool) -> Tensor:
        ctx.group, ctx.exclusive = group, exclusive
        parts = _all_gather(x, group)
        rank = dist.get_rank(group)
        return _sum_in_order(parts[:rank] if exclusive else parts, x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        parts = _all_gather(grad, ctx.group)
        rank = dist.get_rank(ctx.group)
        return _sum_in_order(parts[rank + 1:] if ctx.exclusive else parts, grad), None, None


def _join_last(*parts: Tensor) -> Tensor:
    """The parts (same leading shape) flattened past it and joined along the last axis: one exchange for all."""
    lead = parts[0].shape[:2]
    return torch.cat([p.reshape(*lead, -1) for p in parts], -1)


def _split_last(joined: Tensor, *like: Tensor) -> List[Tensor]:
    """_join_last undone: pieces shaped as `like`."""
    sizes = [math.prod(p.shape[2:]) for p in like]
    return [piece.reshape(p.shape) for piece, p in zip(joined.split(sizes, -1), like)]


def _state_dtype(query: Tensor) -> torch.dtype:
    return torch.float64 if query.dtype == torch.float64 else torch.float32


def _slice_state(key: Tensor, value: Tensor, feature_map: str, key_padding_mask: Optional[Tensor],
                 dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """S = sum_j phi(k_j) v_j^T (B, H, D, M) and z = sum_j phi(k_j) (B, H, D) over the slice's valid keys,
    in the states' dtype (phi in float32 at least, as the ops compute it)."""
    k = apply_feature_map(key.to(dtype), feature_map)
    v = value.to(dtype)
    if key_padding_mask is not None:  # padded keys count for nothing, whatever they hold
        keep = ~key_padding_mask.to(torch.bool)[:, None, :, None]
        k = torch.where(keep, k, torch.zeros((), dtype=dtype, device=k.device))
        v = torch.where(keep, v, torch.zeros((), dtype=dtype, device=v.device))
    return torch.einsum("bhld,bhlm->bhdm", k, v), k.sum(2)


_FEATURE_MAPS = ("elu1", "relu", "sigmoid", "identity")


def _check_slices(name: str, query: Tensor, key: Tensor, value: Tensor, feature_map: str, eps: float) -> None:
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"{name}: query, key and value must be (B, H, L, D) slices, got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    if (key.shape[:2] != query.shape[:2] or value.shape[:3] != key.shape[:3] or key.shape[3] != query.shape[3]):
        raise ValueError(f"{name}: expected query (B, H, L, D), key (B, H, S, D) and value (B, H, S, M), got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    if feature_map not in _FEATURE_MAPS:
        raise ValueError(f"{name}: feature_map must be one of {', '.join(_FEATURE_MAPS)}, got {feature_map!r}")
    if not eps >= 0:
        raise ValueError(f"{name}: eps must be a non-negative number, got {eps}")


def sequence_parallel_causal_linear_attention(query: Tensor, key: Tensor, value: Tensor, *, group=None,
                                              feature_map: str = "elu1", normalize: bool = True,
                                              eps: float = 1e-6, initial_kv: Optional[Tensor] = None,
                                              initial_z: Optional[Tensor] = None) -> Tensor:
    """causal_linear_attention over a sequence split across the ranks of `group` (default: the world).

    Args:
        query, key (B, H, L_r, D), value (B, H, L_r, M): this rank's contiguous slice of the sequence (the
            slices in rank order; L_r may differ between ranks).
        feature_map, normalize, eps: as F.causal_linear_attention, the same on every rank.
        initial_kv (B, H, D, M), initial_z (B, H, D): the state before the whole sequence, passed by rank 0
            only (None on the others; None: zeros).

    Returns:
        This rank's slice of the output, (B, H, L_r, M). Differentiable in query, key, value and rank 0's
        initial state, as one run of F.causal_linear_attention on the whole sequence.
    """
    name = "sequence_parallel_causal_linear_attention"
    _check_slices(name, query, key, value, feature_map, eps)
    rank = dist.get_rank(group)
    if rank != 0 and (initial_kv is not None or initial_z is not None):
        raise ValueError(f"{name}: initial_kv and initial_z are the state before the whole sequence: pass them on "
                         f"rank 0 only (rank {rank} got one)")
    kv, z = _slice_state(key, value, feature_map, None, _state_dtype(query))
    if rank == 0:  # rank 0's share of the scan carries the initial state
        kv = kv if initial_kv is None else kv + initial_kv
        z = z if initial_z is None else z + initial_z
    incoming_kv, incoming_z = _split_last(_RankSum.apply(_join_last(kv, z), group, True), kv, z)
    if rank == 0:
        incoming_kv = incoming_kv if initial_kv is None else incoming_kv + initial_kv
        incoming_z = incoming_z if initial_z is None else incoming_z + initial_z
    out, _, _ = F.causal_linear_attention(query, key, value, feature_map=feature_map, normalize=normalize, eps=eps,
                                          initial_kv=incoming_kv, initial_z=incoming_z)
    return out


def sequence_parallel_linear_attention(query: Tensor, key: Tensor, value: Tensor, *, group=None,
                                       feature_map: str = "elu1", eps: float = 1e-6,
                                       key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """linear_attention (non-causal) over a sequence split across the ranks of `group` (default: the world):
    every query attends to the keys of every rank.

    Args:
        query (B, H, L_r, D), key (B, H, S_r, D), value (B, H, S_r, M): this rank's slices (in rank order;
            lengths may differ between ranks, and queries from keys).
        feature_map, eps: as F.linear_attention, the same on every rank.
        key_padding_mask: bool (B, S_r), True marks a padded key of this rank's slice (a rank may have all
            its keys padded).

    Returns:
        This rank's queries' output, (B, H, L_r, M) in the dtype of query. Differentiable in query, key and
        value, as one run of F.linear_attention on the whole sequence.
    """
    name = "sequence_parallel_linear_attention"
    _check_slices(name, query, key, value, feature_map, eps)
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool or
                                         tuple(key_padding_mask.shape) != (key.shape[0], key.shape[2])):
        raise ValueError(f"{name}: key_padding_mask must be bool (B, S) = {(key.shape[0], key.shape[2])} for this "
                         f"rank's keys, got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    dtype = _state_dtype(query)
    kv, z = _slice_state(key, value, feature_map, key_padding_mask, dtype)
    kv, z = _split_last(_RankSum.apply(_join_last(kv, z), group, False), kv, z)
    q = apply_feature_map(query.to(dtype), feature_map)
    out = torch.einsum("bhld,bhdm->bhlm", q, kv) / (torch.einsum("bhld,bhd->bhl", q, z) + eps)[..., None]
    return out.to(query.dtype)


_NEG = -1e30  # a finite stand-in for log 0 (no NaN in the gradients of logsumexp, max and where)


def _valid_rows(query: Tensor, query_padding_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                causal: bool) -> Tuple[Tensor, Tensor]:
    """(B, 1, L, 1) validity of the slice's query rows and key rows (causal: a position is padding if either
    mask marks it)."""
    B, _, L, _ = query.shape
    qpad = torch.zeros(B, L, dtype=torch.bool, device=query.device) if query_padding_mask is None \
        else query_padding_mask.to(torch.bool)
    kpad = torch.zeros(B, L, dtype=torch.bool, device=query.device) if key_padding_mask is None \
        else key_padding_mask.to(torch.bool)
    if causal:
        qpad = kpad = qpad | kpad
    return (~qpad)[:, None, :, None], (~kpad)[:, None, :, None]


def _features(x: Tensor, valid: Tensor, feature_map: str, dtype: torch.dtype) -> Tensor:
    """phi(x) in `dtype`, 0 on invalid rows (whatever they hold)."""
    return torch.where(valid, apply_feature_map(x.to(dtype), feature_map), torch.zeros((), dtype=dtype,
                                                                                       device=x.device))


def _causal_flow_incoming_state(query, key, value, group, feature_map, eps, clamp, valid) -> Tensor:
    """The packed state of causal_flow_attention (state_layout.h) before this rank's slice: four rounds of
    exchange, each statistic needing the prefixes of the one before (n, sum k, sum q; then sum O k, sum I q,
    whose weights depend on those; then the competition's normaliser, of sources that depend on sum I q;
    then sum k (c v)^T, whose c depends on the normaliser), every one computed for the slice from its
    incoming values, differentiably."""
    dtype = _state_dtype(query)
    zero = torch.zeros((), dtype=dtype, device=query.device)
    q = _features(query, valid, feature_map, dtype)
    k = _features(key, valid, feature_map, dtype)
    v = torch.where(valid, value.to(dtype), zero)
    ok = valid[..., 0].expand(q.shape[:3])  # (B, H, L)
    # n, sum k, sum q.
    count = ok.to(dtype)
    n_in, K_in, Q_in = _split_last(_RankSum.apply(_join_last(count.sum(-1), k.sum(2), q.sum(2)), group, True),
                                   count.sum(-1), k.sum(2), q.sum(2))
    n = n_in[..., None] + count.cumsum(-1)
    safe_n = torch.where(ok, n, torch.ones_like(n))
    K = K_in[:, :, None] + k.cumsum(2)
    Q = Q_in[:, :, None] + q.cumsum(2)
    I = torch.where(ok, safe_n / _dot_eps(q, K, eps), zero)
    O = torch.where(ok, safe_n / _dot_eps(k, Q, eps), zero)
    # sum O k, sum I q.
    A_r, B_r = (O[..., None] * k).sum(2), (I[..., None] * q).sum(2)
    A_in, B_in = _split_last(_RankSum.apply(_join_last(A_r, B_r), group, True), A_r, B_r)
    B_prefix = B_in[:, :, None] + (I[..., None] * q).cumsum(2)
    source = torch.where(ok, torch.clamp(_dot_eps(k, B_prefix, eps) / safe_n, -clamp, clamp), zero + _NEG)
    # The competition's normaliser: log sum exp(source) of the ranks before, and their largest source.
    lse_r = torch.logsumexp(source, -1)  # _NEG + log L where the slice has no valid position
    m_r = source.amax(-1)
    lse_all, m_all = _AllGather.apply(torch.stack([lse_r, m_r]), group).unbind(1)
    # Over the ranks before this one, as a mask: the same graph on every rank, so that their backwards run
    # the same collectives in the same order.
    before = (torch.arange(lse_all.shape[0], device=lse_all.device) < dist.get_rank(group))[:, None, None]
    lse_in = torch.logsumexp(torch.where(before, lse_all, zero + _NEG), 0)
    m_in = torch.where(before, m_all, zero + _NEG).amax(0)
    started = n_in > 0
    lse = torch.logaddexp(lse_in[..., None], torch.logcumsumexp(source, -1))
    c = torch.where(ok, safe_n * torch.exp(source - lse), zero)
    # sum k (c v)^T.
    S_in = _RankSum.apply(torch.einsum("bhl,bhld,bhlm->bhdm", c, k, v), group, True)
    m_field = torch.where(started, m_in, zero)
    E_field = torch.where(started, torch.exp(lse_in - m_in), zero)
    return torch.cat([n_in[..., None], m_field[..., None], E_field[..., None], K_in, Q_in, A_in, B_in,
                      S_in.flatten(2)], -1)


def _noncausal_flow(query, key, value, group, feature_map, eps, clamp, qvalid, kvalid) -> Tensor:
    """Non-causal Flow-Attention over the keys of every rank (reference.py's factors, with the sums over
    queries and keys exchanged): four rounds (counts and sums of q and k; sum O k and sum I q; the
    competition's normaliser; sum k (c v)^T)."""
    dtype = _state_dtype(query)
    zero = torch.zeros((), dtype=dtype, device=query.device)
    q = _features(query, qvalid, feature_map, dtype)
    k = _features(key, kvalid, feature_map, dtype)
    v = torch.where(kvalid, value.to(dtype), zero)
    counts = torch.stack([qvalid.to(dtype).sum((1, 2, 3)), kvalid.to(dtype).sum((1, 2, 3))], -1)  # (B, 2)
    counts = counts[:, None].expand(-1, q.shape[1], -1)  # (B, H, 2)
    counts, k_sum, q_sum = _split_last(_RankSum.apply(_join_last(counts, k.sum(2), q.sum(2)), group, False),
                                       counts, k.sum(2), q.sum(2))
    n_q, n_k = counts[:, :1, None, :].unbind(-1)  # (B, 1, 1) each
    k_sum, q_sum = k_sum[:, :, None], q_sum[:, :, None]
    sink_incoming = 1.0 / _dot_eps(q, k_sum, eps)  # (B, H, L)
    source_outgoing = 1.0 / _dot_eps(k, q_sum, eps)  # (B, H, S)
    ok_r = (k * source_outgoing[..., None]).sum(2, keepdim=True)
    iq_r = (q * sink_incoming[..., None]).sum(2, keepdim=True)
    ok_sum, iq_sum = _split_last(_RankSum.apply(_join_last(ok_r, iq_r), group, False), ok_r, iq_r)
    conserved_sink = _dot_eps(q, ok_sum, eps)
    conserved_source = torch.clamp(_dot_eps(k, iq_sum, eps), -clamp, clamp)
    safe_n_k = n_k.clamp(min=1)
    allocation = torch.sigmoid(conserved_sink * (n_q / safe_n_k))
    logits = torch.where(kvalid[..., 0], conserved_source, zero + _NEG)
    lse = torch.logsumexp(_AllGather.apply(torch.logsumexp(logits, -1), group), 0)  # over every rank's keys
    competition = torch.where(kvalid[..., 0], torch.exp(logits - lse[..., None]) * safe_n_k, zero)
    kv = _RankSum.apply(torch.einsum("bhs,bhsd,bhsm->bhdm", competition, k, v), group, False)
    out = (q @ kv) * (sink_incoming * allocation)[..., None]
    keep = qvalid & ((n_q > 0) & (n_k > 0))[:, None]
    return torch.where(keep, out, zero).to(query.dtype)


def sequence_parallel_flow_attention(query: Tensor, key: Tensor, value: Tensor, *, causal: bool = False, group=None,
                                     feature_map: str = "sigmoid", eps: float = 1e-6, clamp: float = 1.0,
                                     query_padding_mask: Optional[Tensor] = None,
                                     key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """flow_attention over a sequence split across the ranks of `group` (default: the world).

    Args:
        query (B, H, L_r, D), key (B, H, S_r, D), value (B, H, S_r, M): this rank's slices (in rank order;
            causal: S_r = L_r, the same positions).
        causal, feature_map, eps, clamp: as F.flow_attention, the same on every rank.
        query_padding_mask (B, L_r), key_padding_mask (B, S_r): bool, True marks padding in this rank's
            slice (a rank may be all padding).

    Returns:
        This rank's queries' output, (B, H, L_r, M) in the dtype of query, as one run of F.flow_attention on
        the whole sequence. Differentiable in query, key and value. Causal: the slice runs
        causal_flow_attention from the recurrent state of the ranks before it, exchanged in four rounds
        (each statistic needs the prefixes of the one before); non-causal: four rounds of sums. Either way
        O(world B H D M) numbers a rank, whatever the length.
    """
    name = "sequence_parallel_flow_attention"
    _check_slices(name, query, key, value, feature_map, eps)
    if causal and key.shape[2] != query.shape[2]:
        raise ValueError(f"{name}: causal=True needs query and key slices of the same length, got "
                         f"{query.shape[2]} and {key.shape[2]}")
    for mask_name, mask, length in (("query_padding_mask", query_padding_mask, query.shape[2]),
                                    ("key_padding_mask", key_padding_mask, key.shape[2])):
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (query.shape[0], length)):
            raise ValueError(f"{name}: {mask_name} must be bool {(query.shape[0], length)} for this rank's slice, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
    if not causal:
        qvalid = torch.ones_like(query[:, :1, :, :1], dtype=torch.bool) if query_padding_mask is None \
            else ~query_padding_mask[:, None, :, None]
        kvalid = torch.ones_like(key[:, :1, :, :1], dtype=torch.bool) if key_padding_mask is None \
            else ~key_padding_mask[:, None, :, None]
        return _noncausal_flow(query, key, value, group, feature_map, eps, clamp, qvalid, kvalid)
    valid, _ = _valid_rows(query, query_padding_mask, key_padding_mask, True)
    state = _causal_flow_incoming_state(query, key, value, group, feature_map, eps, clamp, valid)
    out, _ = F.causal_flow_attention(query, key, value, feature_map=feature_map, eps=eps, clamp=clamp, state=state,
                                     query_padding_mask=query_padding_mask, key_padding_mask=key_padding_mask)
    return out
