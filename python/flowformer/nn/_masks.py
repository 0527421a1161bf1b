"""nn.MultiheadAttention's masks, translated to what linear-complexity attention can apply: padding
masks, and the causal pattern. Any other attention mask is an error that says what to do instead."""

from typing import Optional

import torch
from torch import Tensor

ARBITRARY_MASK = (
    "{name}: linear-complexity attention cannot apply an arbitrary attention mask: it never forms the "
    "(L, S) score matrix a mask would act on. It applies padding (key_padding_mask) and the causal "
    "pattern (attn_mask True, or -inf, exactly above the diagonal, or is_causal=True). For other "
    "patterns use nn.MultiheadAttention, or split the sequence into the parts that may attend to each other."
)


def padding_mask(mask: Optional[Tensor], name: str) -> Optional[Tensor]:
    """A key_padding_mask as nn.MultiheadAttention takes it (bool, True = padding; or float, -inf =
    padding and 0 = attend) as a bool mask. Other float values are additive biases: an error."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    if not torch.is_floating_point(mask):
        raise RuntimeError(f"{name}: key_padding_mask must be bool or float, got {mask.dtype}")
    padded = torch.isneginf(mask)
    if not bool(((mask == 0) | padded).all()):
        raise RuntimeError(f"{name}: a float key_padding_mask may hold only 0 (attend) and -inf (padding); "
                           "other values are additive biases, which linear attention cannot apply")
    return padded


def is_causal_mask(attn_mask: Tensor, L: int, S: int) -> bool:
    """True if attn_mask ((L, S) or (N * H, L, S), bool or float) masks exactly the pairs above the diagonal."""
    if attn_mask.dim() not in (2, 3) or tuple(attn_mask.shape[-2:]) != (L, S) or L != S:
        return False
    above = torch.ones(L, S, dtype=torch.bool, device=attn_mask.device).triu(1)
    if attn_mask.dtype == torch.bool:
        return bool((attn_mask == above).all())
    masked = torch.isneginf(attn_mask)
    return bool((masked == above).all() and (attn_mask.masked_fill(masked, 0) == 0).all())


def causal_mode(attn_mask: Optional[Tensor], is_causal: bool, L: int, S: int, name: str) -> bool:
    """Whether to run the causal mode; raises for masks that are neither None nor causal."""
    if attn_mask is None:
        if is_causal and L != S:
            raise RuntimeError(f"{name}: is_causal=True needs query and key of the same length, got {L} and {S}")
        return is_causal
    if not is_causal_mask(attn_mask, L, S):
        raise RuntimeError(ARBITRARY_MASK.format(name=name))
    return True
