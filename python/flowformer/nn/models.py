"""Convenience modules: an encoder layer with linear-complexity attention, and a small sequence classifier."""

from typing import Optional

import torch
from torch import Tensor, nn

from .attention import FlowAttention, LinearAttention

ATTENTIONS = {"flow": FlowAttention, "linear": LinearAttention, "softmax": nn.MultiheadAttention}


class FlowformerEncoderLayer(nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer whose self-attention is FlowAttention (attention="flow"), LinearAttention
    ("linear") or the original nn.MultiheadAttention ("softmax"); `attention_options` go to its constructor
    (feature_map, eps, clamp). Same arguments and forward as nn.TransformerEncoderLayer otherwise."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation="relu", layer_norm_eps: float = 1e-5, batch_first: bool = False, norm_first: bool = False,
                 bias: bool = True, device=None, dtype=None, *, attention: str = "flow", **attention_options):
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first, norm_first,
                         bias, device, dtype)
        if attention not in ATTENTIONS:
            raise ValueError(f"FlowformerEncoderLayer: attention must be one of {sorted(ATTENTIONS)}, got {attention!r}")
        if attention != "softmax":
            self.self_attn = ATTENTIONS[attention](d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first,
                                                   device=device, dtype=dtype, **attention_options)


class Flowformer(nn.Module):
    """A small sequence classifier: token and learned position embeddings, a stack of
    FlowformerEncoderLayer (batch first, pre-norm), a mean over the valid positions, a linear head.

    forward(tokens (B, L) long, padding_mask (B, L) bool, True = padding) -> logits (B, num_classes).
    """

    def __init__(self, vocab_size: int, num_classes: int, d_model: int = 64, nhead: int = 4, num_layers: int = 2,
                 dim_feedforward: int = 128, max_len: int = 2048, dropout: float = 0.1, attention: str = "flow",
                 **attention_options):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_len, d_model)
        layer = FlowformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True, norm_first=True,
                                       attention=attention, **attention_options)
        self.encoder = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(d_model),
                                             enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        L = tokens.shape[1]
        x = self.embed(tokens) + self.position(torch.arange(L, device=tokens.device))
        x = self.encoder(x, src_key_padding_mask=padding_mask)
        if padding_mask is None:
            return self.head(x.mean(1))
        valid = (~padding_mask).unsqueeze(-1).to(x.dtype)
        return self.head((x * valid).sum(1) / valid.sum(1).clamp(min=1))


class FlowformerLM(nn.Module):
    """A small causal language model with causal Flow-Attention (pre-norm blocks), with incremental
    decoding: forward(tokens (B, L)) -> logits (B, L, vocab) for training (teacher forcing), and
    step(tokens (B, T), states) -> (logits (B, T, vocab), states) continuing the sequence from the
    per-layer recurrent states (None at the start), O(d_model^2 / nhead) per token and layer whatever the
    history's length. Steps equal the full forward on the same tokens."""

    def __init__(self, vocab_size: int, d_model: int = 64, nhead: int = 4, num_layers: int = 2,
                 dim_feedforward: int = 128, max_len: int = 4096, dropout: float = 0.0, **attention_options):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(_CausalBlock(d_model, nhead, dim_feedforward, dropout, attention_options)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def _embed(self, tokens: Tensor, start: int) -> Tensor:
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        return self.embed(tokens) + self.position(positions)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self._embed(tokens, 0)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    @torch.no_grad()
    def step(self, tokens: Tensor, states: Optional[list] = None):
        start = 0 if states is None else int(states[0][0, 0, 0].item())  # the state's count n of positions
        x = self._embed(tokens, start)
        new_states = []
        for i, block in enumerate(self.blocks):
            x, state = block.step(x, None if states is None else states[i])
            new_states.append(state)
        return self.head(self.norm(x)), new_states


class _CausalBlock(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward, dropout, attention_options):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = FlowAttention(d_model, nhead, dropout=dropout, batch_first=True, **attention_options)
        self.mlp = nn.Sequential(nn.Linear(d_model, dim_feedforward), nn.GELU(), nn.Linear(dim_feedforward, d_model),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False, is_causal=True)[0]
        return x + self.mlp(self.norm2(x))

    def step(self, x: Tensor, state: Optional[Tensor]):
        out, state = self.attn.step(self.norm1(x), state)
        x = x + out
        return x + self.mlp(self.norm2(x)), state
