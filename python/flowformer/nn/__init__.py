"""Modules: drop-in replacements for torch.nn.MultiheadAttention, replace_attention, AFT layers, small models."""

from .aft import AFTConv, AFTFull, AFTLocal, AFTSimple
from .attention import FlowAttention, LinearAttention, save_for_cpp
from .models import Flowformer, FlowformerEncoderLayer, FlowformerLM
from .replace import replace_attention

__all__ = ["FlowAttention", "LinearAttention", "Flowformer", "FlowformerEncoderLayer", "FlowformerLM",
           "replace_attention",
           "AFTFull", "AFTLocal", "AFTSimple", "AFTConv", "save_for_cpp"]
