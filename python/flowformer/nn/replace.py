"""replace_attention: swap every nn.MultiheadAttention of a model for FlowAttention or LinearAttention."""

import torch
from torch import nn

from .attention import FlowAttention, LinearAttention

KINDS = {"flow": FlowAttention, "linear": LinearAttention}


def replace_attention(model: nn.Module, kind: str = "flow", **options) -> nn.Module:
    """Replaces, in place, every nn.MultiheadAttention inside `model` by FlowAttention (kind="flow") or
    LinearAttention (kind="linear") with the same configuration and weights; `options` go to their
    constructors (feature_map, eps, clamp). Returns the model. Works with nn.Transformer and its
    encoder and decoder layers, in training and in eval (their fused fast path is not taken)."""
    if kind not in KINDS:
        raise ValueError(f"replace_attention: kind must be one of {sorted(KINDS)}, got {kind!r}")
    cls = KINDS[kind]
    if isinstance(model, nn.MultiheadAttention):
        raise ValueError("replace_attention: pass the model that holds the nn.MultiheadAttention, or build "
                         f"{cls.__name__} directly and load its state_dict")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(parent, name, _converted(child, cls, options))
        if isinstance(parent, nn.TransformerEncoder):
            # Decided at construction from the softmax layers: in eval it would turn padded inputs into
            # nested tensors for the fused softmax kernels.
            parent.use_nested_tensor = False
    return model


def _converted(mha: nn.MultiheadAttention, cls, options):
    param = next(mha.parameters())
    replacement = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                      add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim,
                      vdim=mha.vdim, batch_first=mha.batch_first, device=param.device, dtype=param.dtype, **options)
    with torch.no_grad():
        replacement.load_state_dict(mha.state_dict())
    replacement.train(mha.training)
    return replacement
