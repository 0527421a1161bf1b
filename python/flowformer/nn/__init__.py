"""Modules: drop-in replacements for torch.nn.MultiheadAttention, and replace_attention."""

from .attention import FlowAttention, LinearAttention
from .replace import replace_attention

__all__ = ["FlowAttention", "LinearAttention", "replace_attention"]
