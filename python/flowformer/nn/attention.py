"""Drop-in replacements for torch.nn.MultiheadAttention running Flow-Attention or linear attention.

Same constructor, forward signature, parameter names and shapes as nn.MultiheadAttention (so its
state_dict loads into these modules and back); the attention between the projections is the
flowformer op. Masks: key_padding_mask maps to the op's padding masks (to both sides in
self-attention); attn_mask may be None or the causal mask (or is_causal=True): linear attention cannot
apply any other mask and says so. need_weights=True returns the exact (L, S) matrix the layer applied
to the values, built only on request at O(L S) cost. Dropout applies to the output of the output
projection (as the Flowformer reference code does), not to attention weights, which are never formed.
"""

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as TF

from .. import distributed as D
from .. import functional as F
from .. import reference as R
from . import _masks


class _LinearMultiheadAttention(nn.Module):
    """The projections and argument handling of nn.MultiheadAttention; subclasses supply _attend."""

    # nn.TransformerEncoderLayer and nn.TransformerEncoder take a fused softmax-attention fast path in
    # eval mode, reading the MultiheadAttention weights directly, whenever
    # self_attn._qkv_same_embed_dim is True. False keeps them calling this module's forward; whether
    # the projections are packed is _packed_in_proj.
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be > 0, got {embed_dim} and {num_heads}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._packed_in_proj = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if self._packed_in_proj:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self.sequence_parallel_group = None
        self._reset_parameters()

    def _reset_parameters(self):
        """nn.MultiheadAttention's initialisation."""
        if self._packed_in_proj:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def _split_sequence(self, group) -> None:
        """Runs the attention sequence parallel over the ranks of `group` (flowformer.distributed; None: in one
        process): each rank passes its contiguous slice of the sequence and gets its slice of the output."""
        if group is not None and (self.bias_k is not None or self.add_zero_attn):
            raise ValueError(f"{type(self).__name__}: sequence_parallel_group does not take add_bias_kv or "
                             "add_zero_attn (every rank would add its own key)")
        self.sequence_parallel_group = group

    def _projections(self, query, key, value):
        E = self.embed_dim
        bq, bk, bv = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.split(E)
        if self._packed_in_proj:
            wq, wk, wv = self.in_proj_weight.split(E)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return TF.linear(query, wq, bq), TF.linear(key, wk, bk), TF.linear(value, wv, bv)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        name = type(self).__name__
        if need_weights and self.sequence_parallel_group is not None:
            raise RuntimeError(f"{name}: need_weights=True is not available with sequence_parallel_group (the "
                               "weights span every rank's keys); pass need_weights=False")
        self_attention = query is key  # as nn.Transformer's layers call it: one tensor for query, key, value
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))  # (L, 1, E)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif query.dim() != 3:
            raise RuntimeError(f"{name}: query must be 2-D (L, E) or 3-D, got {query.dim()}-D")
        elif self.batch_first:  # the computation runs (L, N, E), as nn.MultiheadAttention's
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        L, N, _ = query.shape
        q, k, v = self._projections(query, key, value)  # (L, N, E), (S, N, E), (S, N, E)
        pad = _masks.padding_mask(key_padding_mask, name)
        if self.bias_k is not None:  # one more key and value, never padded
            k = torch.cat([k, self.bias_k.expand(1, N, -1)])
            v = torch.cat([v, self.bias_v.expand(1, N, -1)])
            pad = None if pad is None else TF.pad(pad, (0, 1))
            attn_mask = None if attn_mask is None else TF.pad(attn_mask, (0, 1))
            self_attention = False
        H, hd = self.num_heads, self.head_dim
        q, k, v = (t.reshape(t.shape[0], N, H, hd).permute(1, 2, 0, 3) for t in (q, k, v))  # (N, H, len, hd)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, H, 1, hd)], 2)
            v = torch.cat([v, v.new_zeros(N, H, 1, hd)], 2)
            pad = None if pad is None else TF.pad(pad, (0, 1))
            attn_mask = None if attn_mask is None else TF.pad(attn_mask, (0, 1))
            self_attention = False
        causal = _masks.causal_mode(attn_mask, is_causal, L, k.shape[2], name)
        query_pad = pad if self_attention else None
        out = self._attend(q, k, v, causal, query_pad, pad)  # (N, H, L, hd)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(L, N, self.embed_dim))
        out = TF.dropout(out, self.dropout, self.training)
        weights = None
        if need_weights:
            weights = self._weights(q, k, causal, query_pad, pad)  # (N, H, L, S)
            if average_attn_weights:
                weights = weights.mean(1)
        if unbatched:
            return out.squeeze(1), None if weights is None else weights.squeeze(0)
        return (out.transpose(0, 1) if self.batch_first else out), weights

    def _step_heads(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """The projections of x (N, T, E) for a decoding step (self-attention), each (N, H, T, head_dim)."""
        if not self._packed_in_proj or self.bias_k is not None or self.add_zero_attn:
            raise RuntimeError(f"{type(self).__name__}.step: needs kdim = vdim = embed_dim, no add_bias_kv, "
                               "no add_zero_attn")
        N, T, _ = x.shape
        return tuple(t.view(N, T, self.num_heads, self.head_dim).transpose(1, 2) for t in self._projections(x, x, x))

    def _step_output(self, out: Tensor) -> Tensor:
        """The output projection of a decoding step's attention output (N, H, T, head_dim): (N, T, E)."""
        N, _, T, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(N, T, self.embed_dim))


class FlowAttention(_LinearMultiheadAttention):
    """nn.MultiheadAttention with Flow-Attention (flowformer.functional.flow_attention) between the
    projections. Extra keyword options: feature_map ("sigmoid"), eps (1e-6), clamp (1.0).

    sequence_parallel_group: a torch.distributed process group (or dist.group.WORLD) over whose ranks the
    sequence is split (flowformer.distributed): each rank passes its contiguous slice of the sequence (rank
    order; batch and embedding as usual) and gets its slice of the output. The parameters' gradients are
    each rank's share: all-reduce them (as data parallelism does). Not with add_bias_kv, add_zero_attn or
    need_weights=True (each spans the ranks)."""

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *, feature_map="sigmoid",
                 eps=1e-6, clamp=1.0, sequence_parallel_group=None):
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device, dtype)
        self.options = {"feature_map": feature_map, "eps": eps, "clamp": clamp}
        self._split_sequence(sequence_parallel_group)

    def _attend(self, q, k, v, causal, query_pad, key_pad):
        attend = F.flow_attention
        if self.sequence_parallel_group is not None:
            attend = functools.partial(D.sequence_parallel_flow_attention, group=self.sequence_parallel_group)
        return attend(q, k, v, causal=causal, query_padding_mask=query_pad, key_padding_mask=key_pad, **self.options)

    def _weights(self, q, k, causal, query_pad, key_pad):
        return R.flow_attention_weights(q, k, causal=causal, query_padding_mask=query_pad,
                                        key_padding_mask=key_pad, **self.options)

    def step(self, x: Tensor, state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Causal self-attention over new positions x (N, T, E) (batch first; T = 1 for one decoding step)
        after the positions summarised by `state` (None: none), in O(T D M) per head: returns the output
        (N, T, E) and the state after them (F.causal_flow_attention's layout)."""
        q, k, v = self._step_heads(x)
        out, state = F.causal_flow_attention(q, k, v, state=state, **self.options)
        return self._step_output(out), state


class LinearAttention(_LinearMultiheadAttention):
    """nn.MultiheadAttention with linear attention (Katharopoulos et al., 2020) between the projections.
    Extra keyword options: feature_map ("elu1"), eps (1e-6). Padded queries get outputs, as in
    nn.MultiheadAttention. In causal mode a key_padding_mask may only pad on the right (the causal op
    has no padding mask; right padding cannot reach valid positions).

    sequence_parallel_group: as FlowAttention's."""

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *, feature_map="elu1", eps=1e-6,
                 sequence_parallel_group=None):
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device, dtype)
        self.options = {"feature_map": feature_map, "eps": eps}
        self._split_sequence(sequence_parallel_group)

    def _attend(self, q, k, v, causal, query_pad, key_pad):
        group = self.sequence_parallel_group
        if not causal:
            if group is not None:
                return D.sequence_parallel_linear_attention(q, k, v, group=group, key_padding_mask=key_pad,
                                                            **self.options)
            return F.linear_attention(q, k, v, key_padding_mask=key_pad, **self.options)
        if key_pad is not None:
            right_padded = (key_pad.int().diff(dim=1) >= 0).all()
            if not bool(right_padded):
                raise RuntimeError("LinearAttention: in causal mode key_padding_mask may only pad on the right "
                                   "(True after the last valid position); use FlowAttention for other padding")
        if group is not None:
            return D.sequence_parallel_causal_linear_attention(q, k, v, group=group, **self.options)
        return F.causal_linear_attention(q, k, v, **self.options)[0]

    def _weights(self, q, k, causal, query_pad, key_pad):
        # Causal: the op ran without the (right) padding, which only padded queries can see.
        return R.linear_attention_weights(q, k, causal=causal, key_padding_mask=None if causal else key_pad,
                                          **self.options)

    @torch.no_grad()
    def step(self, x: Tensor,
             state: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """Causal self-attention over new positions x (N, T, E) (batch first; T = 1 for one decoding step)
        after the positions summarised by `state` (None: none), in O(T D M) per head: returns the output
        (N, T, E) and the state after them, (kv (N, H, D, M), z (N, H, D)) as F.causal_linear_attention
        returns them. No gradient."""
        q, k, v = self._step_heads(x)
        kv, z = (None, None) if state is None else state
        out, kv, z = F.causal_linear_attention(q, k, v, initial_kv=kv, initial_z=z, **self.options)
        return self._step_output(out), (kv, z)


def save_for_cpp(module: FlowAttention, path) -> None:
    """Writes a FlowAttention's configuration and weights for the C++ module flowformer::nn::FlowAttention
    (FlowAttentionImpl::load): torch.save of a dict with "format" = "flowformer.FlowAttention/1",
    embed_dim, num_heads, bias, feature_map, eps, clamp and "state_dict" (tensors by parameter name).
    The C++ module takes packed projections (kdim = vdim = embed_dim), no bias_kv, no zero attention."""
    if not isinstance(module, FlowAttention):
        raise TypeError(f"save_for_cpp: expected a FlowAttention, got {type(module).__name__}")
    if not module._packed_in_proj or module.bias_k is not None or module.add_zero_attn:
        raise ValueError("save_for_cpp: the C++ FlowAttention takes kdim = vdim = embed_dim, no add_bias_kv and "
                         "no add_zero_attn")
    torch.save({
        "format": "flowformer.FlowAttention/1",
        "embed_dim": module.embed_dim,
        "num_heads": module.num_heads,
        "bias": module.in_proj_bias is not None,
        "feature_map": module.options["feature_map"],
        "eps": float(module.options["eps"]),
        "clamp": float(module.options["clamp"]),
        "state_dict": {name: t.detach().cpu().float().contiguous() for name, t in module.state_dict().items()},
    }, path)
