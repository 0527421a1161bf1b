"""flowformer.distributed: sequence-parallel linear and Flow-Attention over spawned process groups of 2 and 4 ranks
(gloo on CPU; NCCL where there are two GPUs, since NCCL takes one rank a device). Each rank checks its slice
of the outputs and gradients, and the exchange volume, in distributed_worker.py."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed_worker
from flowformer import distributed as SP
from flowformer import functional as F
from helpers import FORWARD_TOL, assert_close

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def run_ranks(world, tmp_path, backend="gloo"):
    mp.spawn(distributed_worker.main, args=(world, str(tmp_path / "rendezvous"), backend), nprocs=world, join=True)


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_attention_equals_one_run(world, tmp_path):
    run_ranks(world, tmp_path)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank")
def test_sequence_parallel_attention_on_nccl(tmp_path):
    run_ranks(2, tmp_path, "nccl")


def test_sequence_parallel_errors_name_the_function_and_argument(tmp_path):
    # Checked before any collective: a single-rank group is enough.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        q = torch.randn(1, 2, 5, 4)
        with pytest.raises(ValueError, match="sequence_parallel_linear_attention: feature_map must be one of"):
            SP.sequence_parallel_linear_attention(q, q, q, feature_map="softmax")
        with pytest.raises(ValueError, match=r"key_padding_mask must be bool \(B, S\) = \(1, 5\)"):
            SP.sequence_parallel_linear_attention(q, q, q, key_padding_mask=torch.zeros(1, 4, dtype=torch.bool))
        with pytest.raises(ValueError, match="sequence_parallel_causal_linear_attention: query, key and value must"):
            SP.sequence_parallel_causal_linear_attention(q[0], q[0], q[0])
        with pytest.raises(ValueError, match="eps must be a non-negative number"):
            SP.sequence_parallel_causal_linear_attention(q, q, q, eps=-1.0)
        with pytest.raises(ValueError, match="sequence_parallel_flow_attention: query_padding_mask must be bool"):
            SP.sequence_parallel_flow_attention(q, q, q, query_padding_mask=torch.zeros(1, 5))
        # One rank: the op itself, in every dtype.
        out = SP.sequence_parallel_causal_linear_attention(q, q, q)
        torch.testing.assert_close(out, torch.ops.flowformer.causal_linear_attention(
            q, q, q, feature_map="elu1", normalize=True, eps=1e-6)[0])
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(2, 2, 70, 8).to(dtype)
            pad = torch.rand(2, 70) < 0.2
            for causal in (True, False):
                out = SP.sequence_parallel_flow_attention(x, x, x, causal=causal, key_padding_mask=pad)
                expected = F.flow_attention(x.double(), x.double(), x.double(), causal=causal, key_padding_mask=pad)
                assert out.dtype == dtype
                assert_close(out, expected, FORWARD_TOL[dtype], f"flow causal={causal} {dtype}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["FlowAttention", "LinearAttention"])
def test_modules_refuse_what_spans_ranks(kind):
    from flowformer import nn as fnn
    with pytest.raises(ValueError, match="sequence_parallel_group needs attention='flow' or 'linear'"):
        fnn.FlowformerLM(11, attention="softmax", sequence_parallel_group=object())
    with pytest.raises(ValueError, match=f"{kind}: sequence_parallel_group does not take add_bias_kv or add_zero_attn"):
        getattr(fnn, kind)(8, 2, add_zero_attn=True, sequence_parallel_group=object())
    module = getattr(fnn, kind)(8, 2, sequence_parallel_group=object())
    x = torch.randn(3, 1, 8)
    with pytest.raises(RuntimeError, match="need_weights=True is not available with sequence_parallel_group"):
        module(x, x, x)
