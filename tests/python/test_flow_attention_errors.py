"""Bad input: a RuntimeError naming the op and the argument; empty inputs give empty results."""

import pytest
import torch

from flowformer import functional as F

OP_NAME = "flowformer::flow_attention"


def ok_inputs(B=2, H=3, L=5, S=4, D=6, M=7, dtype=torch.float32):
    return torch.randn(B, H, L, D, dtype=dtype), torch.randn(B, H, S, D, dtype=dtype), torch.randn(B, H, S, M, dtype=dtype)


def expect_error(match, *args, **kwargs):
    with pytest.raises(RuntimeError, match=match) as info:
        F.flow_attention(*args, **kwargs)
    assert OP_NAME in str(info.value)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_shape_errors(device):
    q, k, v = (t.to(device) for t in ok_inputs())
    expect_error(r"query must be a 4-D tensor \(B, H, L, D\), got a 3-D", q[0], k, v)
    expect_error(r"key must be a 4-D tensor", q, k[0], v)
    expect_error(r"value must be a 4-D tensor", q, k, v[0])
    expect_error(r"key must have batch size B = 2 \(as query\), got 3", q, torch.cat([k, k[:1]]), v)
    expect_error(r"value must have batch size B = 2", q, k, torch.cat([v, v[:1]]))
    expect_error(r"key must have heads H = 3", q, k[:, :2], v)
    expect_error(r"value must have heads H = 3", q, k, v[:, :2])
    expect_error(r"key must have feature size D = 6", q, k[..., :5], v)
    expect_error(r"value must have length S = 4 \(as key\), got 3", q, k, v[:, :, :3])
    expect_error(r"query must have feature size D >= 1", q[..., :0], k[..., :0], v)
    expect_error(r"causal=True requires query and key of the same length \(L == S\), got L = 5 and S = 4",
                 q, k, v, causal=True)


def test_dtype_and_device_errors():
    q, k, v = ok_inputs()
    expect_error(r"query must be float32, float16, bfloat16 or float64, got Int", q.int(), k.int(), v.int())
    expect_error(r"key must have the dtype of query \(Float\), got Half", q, k.half(), v)
    expect_error(r"value must have the dtype of query \(Float\), got Double", q, k, v.double())
    expect_error(r"key must be on the device of query \(cpu\), got meta", q, k.to("meta"), v)
    expect_error(r"key_padding_mask must be on the device of query \(cpu\), got meta", q, k, v,
                 key_padding_mask=torch.zeros(2, 4, dtype=torch.bool, device="meta"))


def test_option_errors():
    q, k, v = ok_inputs()
    expect_error(r"feature_map must be one of 'sigmoid', 'elu1', 'relu', 'identity', got 'softmax'",
                 q, k, v, feature_map="softmax")
    expect_error(r"eps must be >= 0, got -0.1", q, k, v, eps=-0.1)
    expect_error(r"clamp must be >= 0", q, k, v, clamp=-1.0)
    expect_error(r"clamp must be >= 0", q, k, v, clamp=float("nan"))


def test_mask_errors():
    q, k, v = ok_inputs()
    expect_error(r"query_padding_mask must be a bool tensor \(True marks padding\), got Float", q, k, v,
                 query_padding_mask=torch.zeros(2, 5))
    expect_error(r"query_padding_mask must have shape \(B, L\) = \(2, 5\), got \[2, 4\]", q, k, v,
                 query_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    expect_error(r"key_padding_mask must have shape \(B, S\) = \(2, 4\), got \[2, 5\]", q, k, v,
                 key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    expect_error(r"key_padding_mask must have shape", q, k, v, key_padding_mask=torch.zeros(2, 1, 4, dtype=torch.bool))


def test_backward_op_errors():
    q, k, v = ok_inputs()
    with pytest.raises(RuntimeError, match=r"flowformer::flow_attention_backward: grad_out must have length L = 5"):
        torch.ops.flowformer.flow_attention_backward(torch.randn(2, 3, 4, 7), q, k, v, causal=False,
                                                     feature_map="sigmoid", eps=1e-6, clamp=1.0,
                                                     query_padding_mask=None, key_padding_mask=None)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(0, 2, 5, 5, 3, 4), (2, 0, 5, 5, 3, 4), (2, 2, 0, 0, 3, 4), (2, 2, 4, 4, 3, 0)])
def test_empty_inputs(shape, causal):
    q, k, v = (t.requires_grad_() for t in ok_inputs(*shape))
    out = F.flow_attention(q, k, v, causal=causal)
    assert out.shape == (*shape[:3], shape[5])
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_no_queries_gives_zero_key_and_value_gradients(monkeypatch):
    monkeypatch.setenv("FLOWFORMER_POISON_OUTPUTS", "1")
    q, k, v = (t.requires_grad_() for t in ok_inputs(L=0))
    out = F.flow_attention(q, k, v)
    assert out.shape == (2, 3, 0, 7)
    (out.sum() + 0 * k.sum() + 0 * v.sum()).backward()
    assert (k.grad == 0).all() and (v.grad == 0).all()
    grads = torch.ops.flowformer.flow_attention_backward(torch.zeros(2, 3, 0, 7), q, k, v, causal=False,
                                                         feature_map="sigmoid", eps=1e-6, clamp=1.0,
                                                         query_padding_mask=None, key_padding_mask=None)
    assert grads[1].shape == k.shape and (grads[1] == 0).all() and (grads[2] == 0).all()


def test_no_keys_gives_zeros():
    q, k, v = (t.requires_grad_() for t in ok_inputs(S=0))
    out = F.flow_attention(q, k, v)
    assert out.shape == (2, 3, 5, 7) and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()
