"""FlowformerEncoderLayer, the Flowformer classifier, the ListOps generator, and FlowformerLM (training and
incremental decoding with each attention). The demo's tests are in test_demo.py."""

import random

import pytest
import torch

import flowformer.nn as fnn
from flowformer import listops


@pytest.mark.parametrize("attention", ["flow", "linear", "softmax"])
def test_flowformer_classifier_trains(attention):
    torch.manual_seed(0)
    model = fnn.Flowformer(len(listops.VOCAB), 10, d_model=32, nhead=4, num_layers=2, attention=attention)
    ids, pad, labels = listops.batch(random.Random(0), 8, 20, 60)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):  # memorise one batch: the loss must fall
        loss = torch.nn.functional.cross_entropy(model(ids, pad), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_encoder_layer_uses_the_requested_attention():
    assert isinstance(fnn.FlowformerEncoderLayer(16, 4, attention="flow", clamp=5.0).self_attn, fnn.FlowAttention)
    assert isinstance(fnn.FlowformerEncoderLayer(16, 4, attention="linear").self_attn, fnn.LinearAttention)
    assert isinstance(fnn.FlowformerEncoderLayer(16, 4, attention="softmax").self_attn, torch.nn.MultiheadAttention)
    with pytest.raises(ValueError, match="attention must be one of"):
        fnn.FlowformerEncoderLayer(16, 4, attention="sparse")


def test_listops_expressions_evaluate_to_their_labels():
    rng = random.Random(3)
    for _ in range(50):
        tokens, label = listops.sample(rng, 5, 300)
        assert 5 <= len(tokens) <= 300 and 0 <= label <= 9
        assert tokens.count("]") == sum(t in listops.OPERATORS for t in tokens)
        # Re-evaluate with a stack machine, independently of the generator's recursion.
        stack = []
        for t in tokens:
            if t == "]":
                values = []
                while isinstance(stack[-1], int):
                    values.append(stack.pop())
                stack.append(listops.evaluate(stack.pop(), values[::-1]))
            else:
                stack.append(t if t in listops.OPERATORS else int(t))
        assert stack == [label]


@pytest.mark.parametrize("attention", ["flow", "linear", "softmax"])
def test_flowformer_lm_incremental_decoding_equals_the_full_forward(attention):
    torch.manual_seed(0)
    model = fnn.FlowformerLM(20, d_model=32, nhead=4, num_layers=2, attention=attention).eval()
    tokens = torch.randint(0, 20, (2, 30))
    with torch.no_grad():
        full = model(tokens)
    state, steps = None, []
    for piece in (tokens[:, :1], tokens[:, 1:2], tokens[:, 2:17], *tokens[:, 17:].split(1, dim=1)):
        logits, state = model.step(piece, state)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    assert state.position == 30
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())  # trains
    loss.backward()
    assert model.blocks[0].attn.in_proj_weight.grad is not None


@pytest.mark.parametrize("attention", ["flow", "linear", "softmax"])
def test_flowformer_lm_trains(attention):
    torch.manual_seed(0)
    model = fnn.FlowformerLM(12, d_model=32, nhead=4, num_layers=2, attention=attention)
    tokens = torch.randint(0, 12, (4, 41))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):  # memorise one batch of next tokens: the loss must fall
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_flowformer_lm_state_sizes():
    # Flow and linear attention: a state of fixed size; softmax: keys and values of every position.
    B, E, layers, H = 2, 32, 3, 4
    D = E // H
    sizes = {}
    for attention in ("flow", "linear", "softmax"):
        model = fnn.FlowformerLM(10, d_model=E, nhead=H, num_layers=layers, attention=attention).eval()
        _, state = model.step(torch.zeros(B, 5, dtype=torch.long))
        short = state.nbytes()
        for _ in range(7):
            _, state = model.step(torch.zeros(B, 1, dtype=torch.long), state)
        sizes[attention] = (short, state.nbytes())
    assert sizes["flow"] == (layers * B * H * (3 + 4 * D + D * D) * 4,) * 2
    assert sizes["linear"] == (layers * B * H * (D * D + D) * 4,) * 2
    assert sizes["softmax"] == (layers * B * 2 * 5 * E * 4, layers * B * 2 * 12 * E * 4)


def test_flowformer_lm_arguments():
    with pytest.raises(ValueError, match="attention must be one of"):
        fnn.FlowformerLM(10, attention="sparse")
    model = fnn.FlowformerLM(10, d_model=16, max_len=8)
    _, state = model.step(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="past max_len"):
        model.step(torch.zeros(1, 1, dtype=torch.long), state)


def test_linear_attention_step_continues_the_causal_forward():
    torch.manual_seed(0)
    attn = fnn.LinearAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 12, 16)
    with torch.no_grad():
        full = attn(x, x, x, need_weights=False, is_causal=True)[0]
    first, state = attn.step(x[:, :5])
    second, (kv, z) = attn.step(x[:, 5:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=1e-5, atol=1e-6)
    assert kv.shape == (2, 4, 4, 4) and z.shape == (2, 4, 4)
