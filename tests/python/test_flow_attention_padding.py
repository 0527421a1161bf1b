"""The padding property of spec/flow_attention.md: outputs and gradients at valid positions equal a
run on the sequences with the padded positions removed; padded positions give 0 and get 0 gradient."""

import pytest
import torch

from flowformer import functional as F
from helpers import assert_close, devices, randn

OP = "flowformer::flow_attention"


def padding_masks(kind, B, length, gen):
    """(B, length) bool masks, True = padding. Every row keeps at least 3 valid positions: with a single
    one the query and key gradients are O(eps) rounding noise (see test_flow_attention_parity)."""
    lengths = torch.randint(3, length + 1, (B,), generator=gen)
    pos = torch.arange(length)[None, :]
    if kind == "right":
        return pos >= lengths[:, None]
    if kind == "left":
        return pos < (length - lengths)[:, None]
    mask = torch.rand(B, length, generator=gen) < 0.4
    for b in range(B):
        mask[b, torch.randperm(length, generator=gen)[:3]] = False
    return mask


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sides", ["query", "key", "both"])
@pytest.mark.parametrize("kind", ["left", "right", "random"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L", [13, 150])  # 150: several chunks of the CUDA algorithm
def test_padded_batch_equals_unpadded_runs(gen, L, causal, kind, sides, dtype, device):
    B, H, D, M = 4, 2, 5, 3
    S = L if causal else 2 * L // 3
    q = randn(gen, B, H, L, D, dtype=dtype, device=device).requires_grad_()
    k = randn(gen, B, H, S, D, dtype=dtype, device=device).requires_grad_()
    v = randn(gen, B, H, S, M, dtype=dtype, device=device).requires_grad_()
    qmask = padding_masks(kind, B, L, gen).to(device) if sides in ("query", "both") else None
    kmask = padding_masks(kind, B, S, gen).to(device) if sides in ("key", "both") else None
    if causal and sides == "both":  # both masks pad, but their union keeps 3 valid positions per row
        kmask = padding_masks(kind, B, S, gen)
        qmask = torch.rand(B, L, generator=gen) < 0.3
        for b in range(B):
            valid = (~kmask[b]).nonzero()[:, 0]
            qmask[b, valid[:3]] = False
        qmask, kmask = qmask.to(device), kmask.to(device)
    grad_out = randn(gen, B, H, L, M, dtype=dtype, device=device)
    out = F.flow_attention(q, k, v, causal=causal, query_padding_mask=qmask, key_padding_mask=kmask)
    out.backward(grad_out)

    tol = 1e-5 if dtype == torch.float32 else 1e-10
    no_pad = torch.zeros(B, max(L, S), dtype=torch.bool, device=device)
    qpad = qmask if qmask is not None else no_pad[:, :L]
    kpad = kmask if kmask is not None else no_pad[:, :S]
    if causal:  # a position is padding if either mask marks it
        qpad = kpad = qpad | kpad
    for b in range(B):
        qi = (~qpad[b]).nonzero()[:, 0]
        kj = (~kpad[b]).nonzero()[:, 0]
        qb = q[b:b + 1, :, qi].detach().requires_grad_()
        kb = k[b:b + 1, :, kj].detach().requires_grad_()
        vb = v[b:b + 1, :, kj].detach().requires_grad_()
        ob = F.flow_attention(qb, kb, vb, causal=causal)
        ob.backward(grad_out[b:b + 1, :, qi])
        assert_close(out[b:b + 1, :, qi], ob, tol, f"output of element {b}")
        assert_close(q.grad[b:b + 1, :, qi], qb.grad, 2 * tol, f"grad query of element {b}")
        assert_close(k.grad[b:b + 1, :, kj], kb.grad, 2 * tol, f"grad key of element {b}")
        assert_close(v.grad[b:b + 1, :, kj], vb.grad, 2 * tol, f"grad value of element {b}")
        assert (out[b, :, qpad[b]] == 0).all(), "outputs at padded queries must be 0"
        assert (q.grad[b, :, qpad[b]] == 0).all() and (k.grad[b, :, kpad[b]] == 0).all()
        assert (v.grad[b, :, kpad[b]] == 0).all()


@pytest.mark.parametrize("device", devices(OP))
@pytest.mark.parametrize("causal", [False, True])
def test_fully_padded_element_gives_zeros(gen, causal, device):
    B, H, L, D, M = 3, 2, 6, 4, 5
    q, k, v = (randn(gen, B, H, L, n, device=device).requires_grad_() for n in (D, D, M))
    kmask = torch.zeros(B, L, dtype=torch.bool, device=device)
    kmask[1] = True
    out = F.flow_attention(q, k, v, causal=causal, key_padding_mask=kmask)
    out.sum().backward()
    assert (out[1] == 0).all() and (q.grad[1] == 0).all() and (k.grad[1] == 0).all()
    assert out[0].abs().sum() > 0 and torch.isfinite(out).all()
