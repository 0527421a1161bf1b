"""flowformer.nn.FlowAttention and LinearAttention as drop-in replacements for nn.MultiheadAttention."""

import pytest
import torch
from torch import nn
from torch.nn import functional as TF

import flowformer.nn as fnn
from flowformer import functional as F
from helpers import assert_close, randn

MODULES = {"flow": fnn.FlowAttention, "linear": fnn.LinearAttention}
CONFIGS = [
    dict(),
    dict(bias=False),
    dict(kdim=6, vdim=10),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True),
    dict(batch_first=True),
]


def mha_and_ours(kind, E=16, H=4, **config):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, **config)
    ours = MODULES[kind](E, H, **config)
    ours.load_state_dict(mha.state_dict())
    return mha, ours


def make_inputs(gen, config, N=3, L=7, S=9, E=16):
    kdim, vdim = config.get("kdim", E), config.get("vdim", E)
    shape = (lambda n, e: (N, n, e)) if config.get("batch_first") else (lambda n, e: (n, N, e))
    return randn(gen, *shape(L, E)), randn(gen, *shape(S, kdim)), randn(gen, *shape(S, vdim))


def expected_output(module, query, key, value, causal=False, key_padding_mask=None, self_attention=False):
    """The module's projections, the functional op per head, the output projection: written out here."""
    if module.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    L, N, E = query.shape
    H, hd = module.num_heads, module.head_dim
    if module._packed_in_proj:
        wq, wk, wv = module.in_proj_weight.split(E)
    else:
        wq, wk, wv = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    bq, bk, bv = module.in_proj_bias.split(E) if module.in_proj_bias is not None else (None,) * 3
    q, k, v = TF.linear(query, wq, bq), TF.linear(key, wk, bk), TF.linear(value, wv, bv)
    q, k, v = (t.reshape(t.shape[0], N, H, hd).permute(1, 2, 0, 3) for t in (q, k, v))
    if isinstance(module, fnn.FlowAttention):
        out = F.flow_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                               query_padding_mask=key_padding_mask if self_attention else None, **module.options)
    elif causal:
        out = F.causal_linear_attention(q, k, v, **module.options)[0]
    else:
        out = F.linear_attention(q, k, v, key_padding_mask=key_padding_mask, **module.options)
    out = module.out_proj(out.permute(2, 0, 1, 3).reshape(L, N, E))
    return out.transpose(0, 1) if module.batch_first else out


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("config", CONFIGS)
def test_state_dict_round_trip(kind, config):
    mha, ours = mha_and_ours(kind, **config)
    assert set(ours.state_dict()) == set(mha.state_dict())
    back = nn.MultiheadAttention(16, 4, **config)
    back.load_state_dict(ours.state_dict())
    for name, tensor in mha.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    for name, p in mha.named_parameters():  # the same parameter names and shapes
        assert dict(ours.named_parameters())[name].shape == p.shape


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("config", [c for c in CONFIGS if not c.get("add_bias_kv") and not c.get("add_zero_attn")])
def test_output_is_projections_and_the_op(gen, kind, config):
    _, ours = mha_and_ours(kind, **config)
    q, k, v = make_inputs(gen, config)
    out, weights = ours(q, k, v, need_weights=False)
    assert weights is None
    torch.testing.assert_close(out, expected_output(ours, q, k, v))


@pytest.mark.parametrize("kind", MODULES)
def test_self_attention_masks_and_causal(gen, kind):
    _, ours = mha_and_ours(kind, batch_first=True)
    x = randn(gen, 3, 8, 16)
    pad = torch.zeros(3, 8, dtype=torch.bool)
    pad[1, 6:] = True  # right padding (the only kind LinearAttention's causal mode takes)
    float_pad = torch.zeros(3, 8).masked_fill(pad, float("-inf"))
    causal_bool = torch.ones(8, 8, dtype=torch.bool).triu(1)
    causal_float = torch.zeros(8, 8).masked_fill(causal_bool, float("-inf"))
    expected = expected_output(ours, x, x, x, causal=True, key_padding_mask=pad, self_attention=True)
    for mask in (causal_bool, causal_float, causal_bool.expand(3 * 4, 8, 8)):
        for key_padding_mask in (pad, float_pad):
            out, _ = ours(x, x, x, key_padding_mask=key_padding_mask, attn_mask=mask, need_weights=False)
            torch.testing.assert_close(out, expected)
    out, _ = ours(x, x, x, key_padding_mask=pad, is_causal=True, need_weights=False)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("kind", MODULES)
def test_unbatched_input(gen, kind):
    _, ours = mha_and_ours(kind)
    q, k, v = randn(gen, 5, 16), randn(gen, 7, 16), randn(gen, 7, 16)
    out, weights = ours(q, k, v)
    batched, batched_weights = ours(q[:, None], k[:, None], v[:, None])
    assert out.shape == (5, 16) and weights.shape == (5, 7)
    torch.testing.assert_close(out, batched[:, 0])
    torch.testing.assert_close(weights, batched_weights[0])


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("causal", [False, True])
def test_need_weights_reproduces_the_output(gen, kind, causal):
    _, ours = mha_and_ours(kind, batch_first=True)
    x = randn(gen, 2, 9, 16, dtype=torch.float64)
    ours = ours.double()
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, 7:] = True
    out, weights = ours(x, x, x, key_padding_mask=pad, is_causal=causal, average_attn_weights=False)
    assert weights.shape == (2, 4, 9, 9)
    E, H, hd = 16, 4, 4
    v = TF.linear(x, ours.in_proj_weight[2 * E:], ours.in_proj_bias[2 * E:]).reshape(2, 9, H, hd).transpose(1, 2)
    rebuilt = ours.out_proj((weights @ v).transpose(1, 2).reshape(2, 9, E))
    assert_close(rebuilt, out, 1e-10, "weights @ values")
    _, averaged = ours(x, x, x, key_padding_mask=pad, is_causal=causal)
    torch.testing.assert_close(averaged, weights.mean(1))


@pytest.mark.parametrize("kind", MODULES)
def test_arbitrary_mask_gives_a_clear_error(gen, kind):
    _, ours = mha_and_ours(kind)
    x = randn(gen, 6, 2, 16)
    band = torch.ones(6, 6, dtype=torch.bool).triu(2)
    with pytest.raises(RuntimeError, match="cannot apply an arbitrary attention mask"):
        ours(x, x, x, attn_mask=band)
    with pytest.raises(RuntimeError, match="may hold only 0 \\(attend\\) and -inf"):
        ours(x, x, x, key_padding_mask=torch.full((2, 6), -1e9))


def test_linear_attention_causal_left_padding_is_refused(gen):
    _, ours = mha_and_ours("linear", batch_first=True)
    x = randn(gen, 2, 6, 16)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 0] = True
    with pytest.raises(RuntimeError, match="may only pad on the right"):
        ours(x, x, x, key_padding_mask=pad, is_causal=True)


@pytest.mark.parametrize("kind", MODULES)
def test_gradients_and_dropout(gen, kind):
    _, ours = mha_and_ours(kind, dropout=0.5, batch_first=True)
    x = randn(gen, 2, 6, 16).requires_grad_()
    ours.train()
    out, _ = ours(x, x, x, need_weights=False)
    assert (out == 0).any()  # dropout on the output, in training only
    out.sum().backward()
    assert x.grad is not None and ours.in_proj_weight.grad is not None
    ours.eval()
    torch.testing.assert_close(ours(x, x, x)[0], ours(x, x, x)[0])


@pytest.mark.parametrize("kind", MODULES)
def test_compile_fullgraph(gen, kind):
    _, ours = mha_and_ours(kind, batch_first=True)
    x = randn(gen, 2, 12, 16)
    compiled = torch.compile(lambda t: ours(t, t, t, need_weights=False, is_causal=True)[0], fullgraph=True)
    torch.testing.assert_close(compiled(x), ours(x, x, x, need_weights=False, is_causal=True)[0])
