"""Convenience modules: an encoder layer with linear-complexity attention, a small sequence classifier and a
small causal language model with incremental decoding."""

from typing import List, NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as TF

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


class DecodingState(NamedTuple):
    """FlowformerLM.step's state: how many positions the sequences hold, and each layer's attention state:
    Flow-Attention's state tensor, linear attention's (kv, z), or softmax attention's cache of keys and
    values (k, v), each (B, nhead, position, d_model / nhead)."""
    position: int
    layers: List

    def nbytes(self) -> int:
        """The bytes the attention states hold (all layers)."""
        return sum(t.numel() * t.element_size() for layer in self.layers
                   for t in (layer if isinstance(layer, tuple) else (layer,)))


class FlowformerLM(nn.Module):
    """A small causal language model (pre-norm blocks, learned positions) whose attention is causal
    Flow-Attention (attention="flow"), causal linear attention ("linear") or causal softmax attention
    (nn.MultiheadAttention, "softmax"); `attention_options` go to FlowAttention or LinearAttention.

    forward(tokens (B, L), start=0) -> logits (B, L, vocab), for training (teacher forcing); tokens[:, 0] is
    at position `start`. Sequence parallel training: attention="flow" or "linear" with
    sequence_parallel_group (see FlowAttention); each rank passes its slice of the tokens and its first
    position as `start`, and all-reduces the gradients.
    step(tokens (B, T), state) -> (logits (B, T, vocab), state) continues the sequences from `state`
    (None at the start, then the DecodingState the previous step returned). Flow and linear attention
    carry a recurrent state of fixed size, O(d_model^2 / nhead) work per token and layer whatever the
    history's length; softmax attention keeps the keys and values of the whole history, a cache that
    grows by one position a token, with work in proportion to its length. Steps equal the full forward on
    the same tokens. Positions go up to max_len - 1.
    """

    def __init__(self, vocab_size: int, d_model: int = 64, nhead: int = 4, num_layers: int = 2,
                 dim_feedforward: int = 128, max_len: int = 4096, dropout: float = 0.0, attention: str = "flow",
                 **attention_options):
        super().__init__()
        if attention not in _CAUSAL_ATTENTIONS:
            raise ValueError(f"FlowformerLM: attention must be one of {sorted(_CAUSAL_ATTENTIONS)}, "
                             f"got {attention!r}")
        if attention_options.get("sequence_parallel_group") is not None and attention == "softmax":
            raise ValueError("FlowformerLM: sequence_parallel_group needs attention='flow' or 'linear' (softmax "
                             "attention is not sequence parallel)")
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(_CausalBlock(d_model, nhead, dim_feedforward, dropout, attention, attention_options)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def _embed(self, tokens: Tensor, start: int) -> Tensor:
        end = start + tokens.shape[1]
        if end > self.max_len:
            raise ValueError(f"FlowformerLM: positions up to {end - 1}, past max_len = {self.max_len}")
        return self.embed(tokens) + self.position(torch.arange(start, end, device=tokens.device))

    def forward(self, tokens: Tensor, start: int = 0) -> Tensor:
        x = self._embed(tokens, start)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    @torch.no_grad()
    def step(self, tokens: Tensor, state: Optional[DecodingState] = None):
        start = 0 if state is None else state.position
        x = self._embed(tokens, start)
        layers = []
        for i, block in enumerate(self.blocks):
            x, layer = block.step(x, None if state is None else state.layers[i])
            layers.append(layer)
        return self.head(self.norm(x)), DecodingState(start + tokens.shape[1], layers)


class _CausalSoftmaxAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention (batch first) with a decoding step that caches the keys and values."""

    @torch.no_grad()
    def step(self, x: Tensor, cache: Optional[tuple] = None):
        """Causal self-attention over new positions x (N, T, E) after those whose keys and values are in
        `cache` ((k, v), each (N, H, S, E / H); None: none): returns the output (N, T, E) and the cache with
        the new positions appended."""
        N, T, E = x.shape
        q, k, v = (t.view(N, T, self.num_heads, self.head_dim).transpose(1, 2)
                   for t in TF.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1))
        if cache is None:
            k, v = k.contiguous(), v.contiguous()
        else:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        S = k.shape[2]
        mask = None if T == 1 else torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        out = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(N, T, E)), (k, v)


_CAUSAL_ATTENTIONS = {"flow": FlowAttention, "linear": LinearAttention, "softmax": _CausalSoftmaxAttention}


class _CausalBlock(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward, dropout, attention, attention_options):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = _CAUSAL_ATTENTIONS[attention](d_model, nhead, dropout=dropout, batch_first=True,
                                                  **attention_options)
        self.mlp = nn.Sequential(nn.Linear(d_model, dim_feedforward), nn.GELU(), nn.Linear(dim_feedforward, d_model),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        # nn.MultiheadAttention takes is_causal only as a hint that comes with the mask.
        mask = (nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
                if isinstance(self.attn, nn.MultiheadAttention) else None)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask, is_causal=True)[0]
        return x + self.mlp(self.norm2(x))

    def step(self, x: Tensor, state):
        out, state = self.attn.step(self.norm1(x), state)
        x = x + out
        return x + self.mlp(self.norm2(x)), state
