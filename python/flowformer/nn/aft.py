"""AFT layers (Zhai et al., "An Attention Free Transformer", 2021): projections around the flowformer AFT ops.

AFTFull, AFTLocal and AFTSimple map (B, T, C) -> (B, T, C); AFTConv maps (B, H, W, C) image tokens
(channels last) -> (B, H, W, C). Each projects the input to query, key and value (one Linear each) and
the result back (a Linear), as in the paper.
"""

from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as F


class _AFTBase(nn.Module):
    def __init__(self, d_model: int, bias: bool = True):
        super().__init__()
        self.d_model = d_model
        self.to_q = nn.Linear(d_model, d_model, bias=bias)
        self.to_k = nn.Linear(d_model, d_model, bias=bias)
        self.to_v = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def _project(self, x: Tensor):
        return self.to_q(x), self.to_k(x), self.to_v(x)


class AFTFull(_AFTBase):
    """AFT-full with the learned (T, T) position bias factorised as w = u v^T (u, v: (max_seq_len, rank)),
    as the paper does for long sequences; rank=None learns the full (max_seq_len, max_seq_len) matrix.
    Sequences up to max_seq_len; causal: position t sees t' <= t only."""

    def __init__(self, d_model: int, max_seq_len: int, rank: Optional[int] = 64, causal: bool = False,
                 bias: bool = True):
        super().__init__(d_model, bias)
        self.max_seq_len, self.rank, self.causal = max_seq_len, rank, causal
        if rank is None:
            self.pos_bias = nn.Parameter(torch.zeros(max_seq_len, max_seq_len))
            self.u = self.v = None
        else:  # small random factors: w starts near 0, as the full matrix does
            self.pos_bias = None
            self.u = nn.Parameter(torch.randn(max_seq_len, rank) * rank ** -0.5 * 0.1)
            self.v = nn.Parameter(torch.randn(max_seq_len, rank) * rank ** -0.5 * 0.1)

    def position_bias(self, T: int) -> Tensor:
        if T > self.max_seq_len:
            raise RuntimeError(f"{type(self).__name__}: sequence length {T} exceeds max_seq_len {self.max_seq_len}")
        if self.pos_bias is not None:
            return self.pos_bias[:T, :T]
        return self.u[:T] @ self.v[:T].t()

    def _window(self) -> int:
        return 0

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._project(x)
        w = self.position_bias(x.shape[1]).to(x.dtype)
        return self.out_proj(F.aft_full(q, k, v, w, causal=self.causal, window=self._window()))


class AFTLocal(AFTFull):
    """AFT-local: AFTFull whose learned bias applies only where |t - t'| < window (0 elsewhere); O(T window C)."""

    def __init__(self, d_model: int, max_seq_len: int, window: int, rank: Optional[int] = 64, causal: bool = False,
                 bias: bool = True):
        if window <= 0:
            raise ValueError(f"AFTLocal: window must be > 0, got {window}")
        super().__init__(d_model, max_seq_len, rank, causal, bias)
        self.window = window

    def _window(self) -> int:
        return self.window


class AFTSimple(_AFTBase):
    """AFT-simple: no position bias, O(T C); causal: a running recurrence."""

    def __init__(self, d_model: int, causal: bool = False, bias: bool = True):
        super().__init__(d_model, bias)
        self.causal = causal

    def forward(self, x: Tensor) -> Tensor:
        return self.out_proj(F.aft_simple(*self._project(x), causal=self.causal))


class AFTConv(_AFTBase):
    """AFT-conv on an image grid: heads with a shared kernel_size x kernel_size relative bias each, with
    the paper's re-parameterisation w_h = gamma_h (raw_h - mean(raw_h)) / std(raw_h) + beta_h."""

    def __init__(self, d_model: int, heads: int, kernel_size: int, bias: bool = True):
        super().__init__(d_model, bias)
        if d_model % heads != 0 or kernel_size % 2 != 1:
            raise ValueError(f"AFTConv: d_model ({d_model}) must be divisible by heads ({heads}) and kernel_size "
                             f"({kernel_size}) odd")
        self.heads, self.kernel_size = heads, kernel_size
        self.raw_weight = nn.Parameter(torch.randn(heads, kernel_size, kernel_size) * 0.02)
        self.gamma = nn.Parameter(torch.ones(heads))
        self.beta = nn.Parameter(torch.zeros(heads))

    def weight(self) -> Tensor:
        raw = self.raw_weight.flatten(1)
        std = raw.std(1, keepdim=True).clamp(min=1e-6) if raw.shape[1] > 1 else torch.ones_like(raw[:, :1])
        normalised = (raw - raw.mean(1, keepdim=True)) / std
        return (self.gamma[:, None] * normalised + self.beta[:, None]).view_as(self.raw_weight)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._project(x)
        return self.out_proj(F.aft_conv(q, k, v, self.weight().to(x.dtype)))
