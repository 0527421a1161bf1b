"""Linear attention, bad input: a RuntimeError naming the op and the argument; empty inputs work;
every element of every output is written (outputs poisoned with NaN first)."""

import pytest
import torch

from flowformer import functional as F
from helpers import devices, randn

CAUSAL = "flowformer::causal_linear_attention"
NONCAUSAL = "flowformer::linear_attention"


def ok_inputs(B=2, H=3, L=5, S=None, D=6, M=7, dtype=torch.float32):
    S = L if S is None else S
    return torch.randn(B, H, L, D, dtype=dtype), torch.randn(B, H, S, D, dtype=dtype), torch.randn(B, H, S, M, dtype=dtype)


def expect_error(fn, op, match, *args, **kwargs):
    with pytest.raises(RuntimeError, match=match) as info:
        fn(*args, **kwargs)
    assert op in str(info.value)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_causal_errors(device):
    q, k, v = (t.to(device) for t in ok_inputs())
    fn = F.causal_linear_attention

    def error(match, *args, **kwargs):
        expect_error(fn, CAUSAL, match, *args, **kwargs)

    error(r"query must be a 4-D tensor \(B, H, L, D\), got a 3-D", q[0], k, v)
    error(r"key must have length L = 5 \(as query\), got 4", q, k[:, :, :4], v)
    error(r"value must have length L = 5 \(as key\), got 4", q, k, v[:, :, :4])
    error(r"key must have feature size D = 6", q, k[..., :5], v)
    error(r"value must have heads H = 3", q, k, v[:, :2])
    error(r"feature_map must be one of 'sigmoid', 'elu1', 'relu', 'identity', got 'exp'", q, k, v, feature_map="exp")
    error(r"eps must be >= 0, got -1", q, k, v, eps=-1.0)
    kv = torch.zeros(2, 3, 6, 7, device=device)
    error(r"initial_kv must have shape \[2, 3, 6, 7\] \(B, H, D, M\), got \[2, 3, 7, 6\]", q, k, v,
          initial_kv=kv.transpose(2, 3))
    error(r"initial_kv must be Float \(the state dtype for BFloat16 inputs\), got BFloat16", q.bfloat16(),
          k.bfloat16(), v.bfloat16(), initial_kv=kv.bfloat16())
    error(r"initial_z must be a 3-D tensor \(B, H, D\)", q, k, v, initial_z=torch.zeros(2, 3, 6, 1, device=device))
    error(r"initial_z must have shape \[2, 3, 6\]", q, k, v, initial_z=torch.zeros(2, 3, 5, device=device))


def test_causal_dtype_and_device_errors():
    q, k, v = ok_inputs()
    expect_error(F.causal_linear_attention, CAUSAL, r"query must be float32, float16, bfloat16 or float64, got Long",
                 q.long(), k.long(), v.long())
    expect_error(F.causal_linear_attention, CAUSAL, r"value must have the dtype of query \(Float\), got Half",
                 q, k, v.half())
    expect_error(F.causal_linear_attention, CAUSAL, r"initial_kv must be on the device of query \(cpu\), got meta",
                 q, k, v, initial_kv=torch.zeros(2, 3, 6, 7, device="meta"))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_packed_linear_attention_shape_errors(device):
    # Checked by the Meta kernels too: dtype, rank, size, B == 1, the states' N.
    q, k, v = (t.to(device) for t in ok_inputs(B=1))
    cu = torch.tensor([0, 2, 5], device=device)

    def error(match, *args, **kwargs):
        expect_error(F.causal_linear_attention, CAUSAL, match, *args, **kwargs)

    error(r"cu_seqlens must be int32 or int64, got Float", q, k, v, cu_seqlens=cu.float())
    error(r"cu_seqlens must be int32 or int64, got Short", q, k, v, cu_seqlens=cu.short())
    error(r"cu_seqlens must be a 1-D tensor \(N \+ 1,\), got a 2-D tensor of shape \[1, 3\]", q, k, v,
          cu_seqlens=cu[None])
    error(r"cu_seqlens must have N \+ 1 >= 1 elements .*, got shape \[0\]", q, k, v, cu_seqlens=cu[:0])
    q2, k2, v2 = (t.to(device) for t in ok_inputs(B=2))
    error(r"query must have batch size B = 1 \(packed sequences: cu_seqlens given\), got 2", q2, k2, v2,
          cu_seqlens=cu)
    error(r"initial_kv must have shape \[2, 3, 6, 7\] \(N, H, D, M\), got \[1, 3, 6, 7\]", q, k, v, cu_seqlens=cu,
          initial_kv=torch.zeros(1, 3, 6, 7, device=device))
    error(r"initial_z must have shape \[2, 3, 6\] \(N, H, D\), got \[3, 3, 6\]", q, k, v, cu_seqlens=cu,
          initial_z=torch.zeros(3, 3, 6, device=device))
    with pytest.raises(RuntimeError, match=r"causal_linear_attention_backward: grad_final_z must have shape "
                                           r"\[2, 3, 6\] \(N, H, D\), got \[1, 3, 6\]"):
        torch.ops.flowformer.causal_linear_attention_backward(
            torch.randn(1, 3, 5, 7, device=device), None, torch.zeros(1, 3, 6, device=device), q, k, v,
            feature_map="elu1", normalize=True, eps=1e-6, initial_kv=None, initial_z=None, cu_seqlens=cu)


@pytest.mark.parametrize("device", devices(CAUSAL))
@pytest.mark.parametrize("backward", [False, True])
def test_packed_linear_attention_value_errors(backward, device):
    # The values of cu_seqlens, checked by the backends (the forward and the backward op) against L = 5.
    q, k, v = (t.to(device) for t in ok_inputs(B=1))

    def error(match, values):
        cu = torch.tensor(values, dtype=torch.int32, device=device)
        if backward:
            op = torch.ops.flowformer.causal_linear_attention_backward
            with pytest.raises(RuntimeError, match=match) as info:
                op(torch.randn(1, 3, 5, 7, device=device), None, None, q, k, v, feature_map="elu1", normalize=True,
                   eps=1e-6, initial_kv=None, initial_z=None, cu_seqlens=cu)
            assert "flowformer::causal_linear_attention_backward" in str(info.value)
        else:
            expect_error(F.causal_linear_attention, CAUSAL, match, q, k, v, cu_seqlens=cu)

    error(r"cu_seqlens must start with 0, got cu_seqlens\[0\] = 1", [1, 2, 5])
    error(r"cu_seqlens must be non-decreasing, got cu_seqlens\[3\] = 2 < cu_seqlens\[2\] = 4", [0, 1, 4, 2, 5])
    error(r"cu_seqlens must end with the total length L = 5 \(the length of query\), got cu_seqlens\[2\] = 4",
          [0, 2, 4])
    error(r"cu_seqlens must end with the total length L = 5 .*, got cu_seqlens\[0\] = 0", [0])
    error(r"cu_seqlens must end with the total length L = 5 .*, got cu_seqlens\[2\] = 6", [0, 2, 6])


def test_packed_linear_attention_device_error():
    q, k, v = ok_inputs(B=1)
    expect_error(F.causal_linear_attention, CAUSAL,
                 r"cu_seqlens must be on the device of query \(cpu\) or on the CPU, got meta", q, k, v,
                 cu_seqlens=torch.tensor([0, 5], device="meta"))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_noncausal_errors(device):
    q, k, v = (t.to(device) for t in ok_inputs(S=4))

    def error(match, *args, **kwargs):
        expect_error(F.linear_attention, NONCAUSAL, match, *args, **kwargs)

    error(r"value must have length S = 4 \(as key\), got 3", q, k, v[:, :, :3])
    error(r"key must have batch size B = 2 \(as query\), got 1", q, k[:1], v)
    error(r"key_padding_mask must have shape \(B, S\) = \(2, 4\), got \[2, 5\]", q, k, v,
          key_padding_mask=torch.zeros(2, 5, dtype=torch.bool, device=device))
    error(r"key_padding_mask must be a bool tensor", q, k, v, key_padding_mask=torch.zeros(2, 4, device=device))


def test_backward_op_errors():
    q, k, v = ok_inputs()
    with pytest.raises(RuntimeError, match=r"causal_linear_attention_backward: grad_final_kv must have shape"):
        torch.ops.flowformer.causal_linear_attention_backward(
            torch.randn(2, 3, 5, 7), torch.zeros(2, 3, 7, 6), None, q, k, v, feature_map="elu1", normalize=True,
            eps=1e-6, initial_kv=None, initial_z=None, cu_seqlens=None)
    with pytest.raises(RuntimeError, match=r"linear_attention_backward: grad_out must have value size M = 7"):
        torch.ops.flowformer.linear_attention_backward(torch.randn(2, 3, 5, 6), q, k, v, feature_map="elu1",
                                                       eps=1e-6, key_padding_mask=None)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(0, 2, 5, 3, 4), (2, 0, 5, 3, 4), (2, 2, 0, 3, 4), (2, 2, 4, 3, 0)])
def test_empty_inputs(shape, causal):
    B, H, L, D, M = shape
    q, k, v = (t.requires_grad_() for t in ok_inputs(B, H, L, None, D, M))
    if causal:
        out, kv, z = F.causal_linear_attention(q, k, v)
        assert kv.shape == (B, H, D, M) and z.shape == (B, H, D)
        if L == 0:
            assert (kv == 0).all() and (z == 0).all()
    else:
        out = F.linear_attention(q, k, v)
    assert out.shape == (B, H, L, M)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("device", devices(CAUSAL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L", [1, 70])
def test_every_element_written(gen, L, dtype, device, monkeypatch):
    monkeypatch.setenv("FLOWFORMER_POISON_OUTPUTS", "1")
    B, H, D, M = 2, 3, 4, 5
    q, k, v = (randn(gen, B, H, L, n, dtype=dtype, device=device).requires_grad_() for n in (D, D, M))
    kv0 = randn(gen, B, H, D, M, device=device).requires_grad_()
    z0 = torch.rand(B, H, D, generator=gen).add(1).to(device).requires_grad_()
    out, kv, z = F.causal_linear_attention(q, k, v, initial_kv=kv0, initial_z=z0)
    (out.sum() + kv.sum() + z.sum()).backward()
    mask = torch.zeros(B, L, dtype=torch.bool, device=device)
    mask[0, -1] = True
    out2 = F.linear_attention(q, k, v, key_padding_mask=mask)
    out2.sum().backward()
    for t in (out, kv, z, out2, q.grad, k.grad, v.grad, kv0.grad, z0.grad):
        assert not torch.isnan(t).any()


@pytest.mark.parametrize("device", devices(CAUSAL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_element_written_packed_linear_attention(gen, dtype, device, monkeypatch):
    monkeypatch.setenv("FLOWFORMER_POISON_OUTPUTS", "1")
    lengths, H, D, M = (1, 0, 70, 5, 0), 3, 4, 5
    L, N = sum(lengths), len(lengths)
    cu = torch.tensor([0, 1, 1, 71, 76, 76], device=device)
    q, k, v = (randn(gen, 1, H, L, n, dtype=dtype, device=device).requires_grad_() for n in (D, D, M))
    kv0 = randn(gen, N, H, D, M, device=device).requires_grad_()
    z0 = torch.rand(N, H, D, generator=gen).add(1).to(device).requires_grad_()
    out, kv, z = F.causal_linear_attention(q, k, v, initial_kv=kv0, initial_z=z0, cu_seqlens=cu)
    (out.sum() + kv.sum() + z.sum()).backward()
    for t in (out, kv, z, q.grad, k.grad, v.grad, kv0.grad, z0.grad):
        assert not torch.isnan(t).any()
