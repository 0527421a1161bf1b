"""replace_attention on torch's Transformer modules (train and eval: our op must be what runs), on
torchvision's vision transformer when installed, and training under DistributedDataParallel (gloo)."""

import os

import pytest
import torch
from torch import nn

import flowformer.nn as fnn
from helpers import leave_spawned_rank, randn

OPS = {"flow": "flowformer::flow_attention", "linear": ("flowformer::linear_attention",
                                                        "flowformer::causal_linear_attention")}


def ops_called(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [event.name for event in prof.events()]


def transformer(batch_first):
    torch.manual_seed(0)
    return nn.Transformer(d_model=16, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32,
                          dropout=0.0, batch_first=batch_first)


@pytest.mark.parametrize("kind", ["flow", "linear"])
@pytest.mark.parametrize("training", [True, False])
def test_transformer_runs_our_op_in_train_and_eval(gen, kind, training):
    model = fnn.replace_attention(transformer(batch_first=True), kind=kind)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    assert sum(isinstance(m, (fnn.FlowAttention, fnn.LinearAttention)) for m in model.modules()) == 2 + 2 * 2
    model.train(training)
    src, tgt = randn(gen, 3, 11, 16), randn(gen, 3, 7, 16)  # cross-attention with L != S
    src_pad = torch.zeros(3, 11, dtype=torch.bool)
    src_pad[1, 8:] = True
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(7)  # decoder self-attention: causal

    def run():
        with torch.set_grad_enabled(training):
            return model(src, tgt, tgt_mask=tgt_mask, src_key_padding_mask=src_pad,
                         memory_key_padding_mask=src_pad)

    names = ops_called(run)
    expected = OPS[kind] if isinstance(OPS[kind], tuple) else (OPS[kind],)
    calls = sum(names.count(op) for op in expected)
    assert calls == 6, f"{calls} calls of {expected}; the fused softmax fast path must not run"
    out = run()
    assert out.shape == (3, 7, 16) and torch.isfinite(out).all()


def test_weights_are_copied(gen):
    reference = transformer(batch_first=False)
    model = fnn.replace_attention(transformer(batch_first=False), kind="flow")
    for (name, p), (ref_name, ref_p) in zip(model.named_parameters(), reference.named_parameters()):
        assert name == ref_name and torch.equal(p, ref_p)


def test_encoder_eval_fast_path_is_not_taken(gen):
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
    encoder = fnn.replace_attention(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True))
    encoder.eval()
    x = randn(gen, 2, 9, 16)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, 6:] = True
    with torch.no_grad():
        names = ops_called(lambda: encoder(x, src_key_padding_mask=pad))
    assert names.count("flowformer::flow_attention") == 2
    assert "aten::_transformer_encoder_layer_fwd" not in names


def test_vision_transformer_when_torchvision_is_installed(gen):
    models = pytest.importorskip("torchvision.models")
    vit = models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=16,
                                   mlp_dim=32, num_classes=10)
    fnn.replace_attention(vit, kind="flow")
    vit.eval()
    names = ops_called(lambda: vit(randn(gen, 2, 3, 32, 32)))
    assert names.count("flowformer::flow_attention") == 2


def _ddp_worker(rank, world, init_file, state, batches, result_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = fnn.FlowAttention(16, 4, batch_first=True)
    model.load_state_dict(state)
    ddp = nn.parallel.DistributedDataParallel(model)
    x = batches[rank]
    out, _ = ddp(x, x, x, need_weights=False, is_causal=True)
    out.square().mean().backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, result_file)
    dist.destroy_process_group()
    leave_spawned_rank()


def test_distributed_data_parallel_gloo_matches_one_process(gen, tmp_path):
    import torch.multiprocessing as mp
    torch.manual_seed(0)
    model = fnn.FlowAttention(16, 4, batch_first=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [randn(gen, 2, 10, 16), randn(gen, 2, 10, 16)]
    result = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), state, batches, str(result)), nprocs=2, join=True)
    ddp_grads = torch.load(result)
    # One process on the whole batch: the mean over both halves (DDP averages the two gradients).
    x = torch.cat(batches)
    out, _ = model(x, x, x, need_weights=False, is_causal=True)
    losses = out.square().mean(dim=(1, 2))
    ((losses[:2].mean() + losses[2:].mean()) / 2).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-5, atol=1e-6)
