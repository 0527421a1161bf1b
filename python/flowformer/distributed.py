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

Every collective is an all_gather (gloo on CPU, NCCL on CUDA), its parts added in rank order, so every rank
computes the same bits, run after run. Every rank of the group must call the function (and its backward)
together. Results and gradients equal one run of the op on the whole sequence, up to the order of the sums.
Flow-Attention is not sequence parallel yet.
"""

import contextlib
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from flowformer import functional as F
from flowformer.reference import apply_feature_map

__all__ = ["sequence_parallel_causal_linear_attention", "sequence_parallel_linear_attention", "count_exchange"]


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
    incoming_kv = _RankSum.apply(kv, group, True)
    incoming_z = _RankSum.apply(z, group, True)
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
    kv = _RankSum.apply(kv, group, False)
    z = _RankSum.apply(z, group, False)
    q = apply_feature_map(query.to(dtype), feature_map)
    out = torch.einsum("bhld,bhdm->bhlm", q, kv) / (torch.einsum("bhld,bhd->bhl", q, z) + eps)[..., None]
    return out.to(query.dtype)
