"""The ranks' side of test_distributed.py (spawned processes of a gloo or NCCL group): every rank builds the
same whole-sequence inputs from a seed, runs the sequence-parallel op on its slice, and checks its slice of
the output and of every gradient against one run of the op on the whole sequence (in the same process).
A failed check raises, which fails the spawn."""

import torch
import torch.distributed as dist

from flowformer import distributed as SP
from flowformer import functional as F
from flowformer.nn import FlowAttention, LinearAttention
from helpers import leave_spawned_rank

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
# Slice lengths by world size: uneven, one of length 1.
LENGTHS = {2: [7, 1], 4: [5, 1, 9, 3]}


def check(actual, expected, dtype, what):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    err = ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()
    assert err <= TOL[dtype], f"rank {dist.get_rank()}: {what}: relative error {err:.3e} > {TOL[dtype]:.0e}"


def rows(lengths, rank):
    start = sum(lengths[:rank])
    return slice(start, start + lengths[rank])


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def inputs(seed, lengths, dtype, device):
    """The whole sequence's q, k (2, 2, L, 4), v and grad_out (2, 2, L, 3), the same on every rank, and the
    generator that drew them (for what a case draws next)."""
    gen = torch.Generator().manual_seed(seed)
    B, H, L, D, M = 2, 2, sum(lengths), 4, 3
    q, k = (torch.randn(B, H, L, D, generator=gen, dtype=dtype).to(device) for _ in range(2))
    v, grad_out = (torch.randn(B, H, L, M, generator=gen, dtype=dtype).to(device) for _ in range(2))
    return gen, q, k, v, grad_out


def check_slice(mine_out, mine, out, expected, part, dtype, what, nan_inputs=False):
    """This rank's output and its q, k, v leaves' gradients against the whole run's, on its slice (nan_inputs:
    NaN in padded keys, whose gradients both sides may leave NaN)."""
    check(mine_out, out[:, :, part], dtype, f"{what}: out")
    for name, leaf, grad in zip(("query", "key", "value"), mine, expected):
        grad = grad[:, :, part]
        if nan_inputs:
            leaf.grad, grad = leaf.grad.nan_to_num(), grad.nan_to_num()
        check(leaf.grad, grad, dtype, f"{what}: grad {name}")


def causal_cases(lengths, device):
    rank, part = dist.get_rank(), rows(lengths, dist.get_rank())
    for dtype in (torch.float64, torch.float32):
        for feature_map, normalize, with_state in (("elu1", True, False), ("relu", False, True),
                                                   ("sigmoid", True, True)):
            what = f"causal {dtype} {feature_map} normalize={normalize} state={with_state}"
            gen, q, k, v, grad_out = inputs(7, lengths, dtype, device)
            kv0 = torch.randn(2, 2, 4, 3, generator=gen, dtype=dtype).to(device) if with_state else None
            z0 = (torch.rand(2, 2, 4, generator=gen, dtype=dtype) + 1).to(device) if with_state else None
            options = dict(feature_map=feature_map, normalize=normalize)

            whole = leaves(q, k, v, *((kv0, z0) if with_state else ()))
            state = dict(initial_kv=whole[3], initial_z=whole[4]) if with_state else {}
            out = F.causal_linear_attention(*whole[:3], **options, **state)[0]
            expected = torch.autograd.grad((out * grad_out).sum(), whole)

            mine = leaves(q[:, :, part], k[:, :, part], v[:, :, part], *((kv0, z0) if with_state else ()))
            state = dict(initial_kv=mine[3], initial_z=mine[4]) if with_state and rank == 0 else {}
            mine_out = SP.sequence_parallel_causal_linear_attention(*mine[:3], **options, **state)
            (mine_out * grad_out[:, :, part]).sum().backward()
            check_slice(mine_out, mine, out, expected, part, dtype, what)
            if with_state and rank == 0:
                check(mine[3].grad, expected[3], dtype, f"{what}: grad initial_kv")
                check(mine[4].grad, expected[4], dtype, f"{what}: grad initial_z")


def noncausal_cases(lengths, device):
    rank, part = dist.get_rank(), rows(lengths, dist.get_rank())
    for dtype in (torch.float64, torch.float32):
        for padding in ("none", "some", "one rank all padded"):
            what = f"non-causal {dtype} padding {padding}"
            gen, q, k, v, grad_out = inputs(11, lengths, dtype, device)
            mask = None
            if padding != "none":
                mask = torch.rand(2, sum(lengths), generator=gen) < 0.3
                mask[:, 0] = False
                if padding == "one rank all padded":
                    mask[:, rows(lengths, len(lengths) - 1)] = True
                mask = mask.to(device)
                k = k.masked_fill(mask[:, None, :, None], float("nan"))  # padding counts for nothing

            whole = leaves(q, k, v)
            out = F.linear_attention(*whole, key_padding_mask=mask)
            expected = torch.autograd.grad((out * grad_out).sum(), whole)

            mine = leaves(q[:, :, part], k[:, :, part], v[:, :, part])
            mine_out = SP.sequence_parallel_linear_attention(
                *mine, key_padding_mask=None if mask is None else mask[:, part])
            (mine_out * grad_out[:, :, part]).sum().backward()
            check_slice(mine_out, mine, out, expected, part, dtype, what, nan_inputs=True)


def flow_cases(lengths, device):
    # sequence_parallel_flow_attention against flow_attention on the whole sequence, causal or not, with
    # padding (some, and every position of the last rank) and both clamps.
    rank, part = dist.get_rank(), rows(lengths, dist.get_rank())
    for dtype in (torch.float64, torch.float32):
        for causal, feature_map, clamp, padding in ((True, "sigmoid", 1.0, "none"),
                                                    (True, "elu1", float("inf"), "some"),
                                                    (True, "sigmoid", 5.0, "last rank"),
                                                    (False, "sigmoid", 1.0, "none"),
                                                    (False, "relu", float("inf"), "some"),
                                                    (False, "sigmoid", 1.0, "last rank")):
            what = f"flow {dtype} causal={causal} {feature_map} clamp={clamp} padding {padding}"
            gen, q, k, v, grad_out = inputs(17, lengths, dtype, device)
            qpad = kpad = None
            if padding != "none":
                qpad = torch.rand(2, sum(lengths), generator=gen) < 0.2
                kpad = torch.rand(2, sum(lengths), generator=gen) < 0.2
                qpad[:, 0] = kpad[:, 0] = False
                if padding == "last rank":
                    qpad[:, rows(lengths, len(lengths) - 1)] = True
                    kpad[:, rows(lengths, len(lengths) - 1)] = True
                qpad, kpad = qpad.to(device), kpad.to(device)
            options = dict(causal=causal, feature_map=feature_map, clamp=clamp)

            whole = leaves(q, k, v)
            out = F.flow_attention(*whole, query_padding_mask=qpad, key_padding_mask=kpad, **options)
            expected = torch.autograd.grad((out * grad_out).sum(), whole)

            mine = leaves(q[:, :, part], k[:, :, part], v[:, :, part])
            mine_out = SP.sequence_parallel_flow_attention(
                *mine, query_padding_mask=None if qpad is None else qpad[:, part],
                key_padding_mask=None if kpad is None else kpad[:, part], **options)
            (mine_out * grad_out[:, :, part]).sum().backward()
            check_slice(mine_out, mine, out, expected, part, dtype, what)


def module_cases(lengths, device):
    # FlowAttention and LinearAttention with sequence_parallel_group: outputs, input gradients, and the
    # parameters' gradients (each rank's share, all-reduced) against the module on the whole sequence.
    rank, part = dist.get_rank(), rows(lengths, dist.get_rank())
    for kind, causal in ((FlowAttention, True), (FlowAttention, False), (LinearAttention, True),
                         (LinearAttention, False)):
        what = f"{kind.__name__} causal={causal}"
        torch.manual_seed(3)
        whole_module = kind(8, 2, batch_first=True, dtype=torch.float64).to(device)
        module = kind(8, 2, batch_first=True, dtype=torch.float64, sequence_parallel_group=dist.group.WORLD).to(device)
        module.load_state_dict(whole_module.state_dict())
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(2, sum(lengths), 8, generator=gen, dtype=torch.float64).to(device)
        grad_out = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device)

        (x_whole,) = leaves(x)
        out = whole_module(x_whole, x_whole, x_whole, need_weights=False, is_causal=causal)[0]
        (out * grad_out).sum().backward()
        (x_mine,) = leaves(x[:, part])
        mine_out = module(x_mine, x_mine, x_mine, need_weights=False, is_causal=causal)[0]
        (mine_out * grad_out[:, part]).sum().backward()
        check(mine_out, out[:, part], torch.float64, f"{what}: out")
        check(x_mine.grad, x_whole.grad[:, part], torch.float64, f"{what}: grad input")
        for (name, p), p_whole in zip(module.named_parameters(), whole_module.parameters()):
            dist.all_reduce(p.grad)
            check(p.grad, p_whole.grad, torch.float64, f"{what}: grad {name}")


def training_steps(lengths, device):
    # A FlowformerLM with sequence-parallel flow or linear attention, its tokens split over the ranks, trained
    # for a few steps (each rank's loss share, gradients all-reduced) matches the model trained on the whole
    # sequences in one process, step for step.
    for attention in ("flow", "linear"):
        train_in_slices(lengths, device, attention)


def train_in_slices(lengths, device, attention):
    from flowformer.nn import FlowformerLM
    rank, part = dist.get_rank(), rows(lengths, dist.get_rank())
    options = dict(vocab_size=11, d_model=16, nhead=2, num_layers=2, dim_feedforward=32, max_len=64,
                   attention=attention)
    torch.manual_seed(9)
    whole = FlowformerLM(**options).double().to(device)
    mine = FlowformerLM(**options, sequence_parallel_group=dist.group.WORLD).double().to(device)
    mine.load_state_dict(whole.state_dict())
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (whole, mine)]
    gen = torch.Generator().manual_seed(13)
    for step in range(3):
        tokens = torch.randint(0, 11, (2, sum(lengths) + 1), generator=gen).to(device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        count = targets.numel()
        loss = torch.nn.functional.cross_entropy(whole(inputs).flatten(0, 1), targets.flatten(), reduction="sum")
        (loss / count).backward()
        logits = mine(inputs[:, part], start=part.start)
        share = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[:, part].flatten(), reduction="sum")
        (share / count).backward()
        total = share.detach().clone()
        dist.all_reduce(total)
        check(total, loss, torch.float64, f"{attention}: training step {step}: loss")
        for p in mine.parameters():
            dist.all_reduce(p.grad)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        for (name, p), p_whole in zip(mine.named_parameters(), whole.parameters()):
            check(p, p_whole, torch.float64, f"{attention}: training step {step}: {name}")


def exchange_volume(device):
    # The bytes a rank sends do not depend on the sequence's length: states and sums only.
    counts = {}
    B, H, D, M = 2, 3, 4, 5
    functions = {"causal linear": SP.sequence_parallel_causal_linear_attention,
                 "linear": SP.sequence_parallel_linear_attention,
                 "causal flow": lambda *x: SP.sequence_parallel_flow_attention(*x, causal=True),
                 "flow": SP.sequence_parallel_flow_attention}
    for per_rank in (1, 40):
        q, k = (torch.randn(B, H, per_rank, D, dtype=torch.float64, device=device) for _ in range(2))
        v = torch.randn(B, H, per_rank, M, dtype=torch.float64, device=device)
        for name, fn in functions.items():
            mine = leaves(q, k, v)
            with SP.count_exchange() as count:
                fn(*mine).sum().backward()
            counts.setdefault(name, []).append((count.collectives, count.bytes_sent))
    for name, (short, long) in counts.items():
        assert short == long, f"{name}: the exchange depends on the length: {short} and {long}"
        assert long[1] <= 4 * (B * H * D * M + 8 * B * H * D) * 8, f"{name}: {long[1]} bytes"
    state_bytes = (B * H * D * M + B * H * D) * 8  # linear attention: kv and z at once, forward and backward
    assert counts["linear"][0] == counts["causal linear"][0] == (2, 2 * state_bytes), counts
    assert counts["flow"][0][0] == counts["causal flow"][0][0] == 8, counts  # four rounds, and back


def main(rank, world, rendezvous, backend):
    torch.set_num_threads(1)
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        lengths = LENGTHS[world]
        causal_cases(lengths, device)
        noncausal_cases(lengths, device)
        flow_cases(lengths, device)
        module_cases(lengths, device)
        training_steps(lengths, device)
        exchange_volume(device)
    finally:
        dist.destroy_process_group()
    leave_spawned_rank()
