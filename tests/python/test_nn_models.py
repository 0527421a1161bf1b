"""FlowformerEncoderLayer, the Flowformer classifier, the ListOps generator and the demo (tiny size)."""

import json
import random

import pytest
import torch

import flowformer.nn as fnn
from flowformer import demo, listops


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


def test_demo_runs_end_to_end_at_a_tiny_size(tmp_path):
    demo.main(["--steps", "2", "--min-len", "10", "--max-len", "40", "--batch", "4", "--dim", "16",
               "--eval-every", "1", "--eval-batches", "1", "--device", "cpu", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "listops.json").read_text())["results"]
    assert [r["attention"] for r in results] == ["flow", "linear", "softmax"]
    assert all(0 <= r["accuracy"] <= 1 and r["tokens_per_s"] > 0 for r in results)
    assert (tmp_path / "listops.md").exists() and (tmp_path / "listops.png").exists()


def test_flowformer_lm_incremental_decoding_equals_the_full_forward():
    torch.manual_seed(0)
    model = fnn.FlowformerLM(20, d_model=32, nhead=4, num_layers=2).eval()
    tokens = torch.randint(0, 20, (2, 30))
    with torch.no_grad():
        full = model(tokens)
    states, steps = None, []
    for piece in (tokens[:, :1], tokens[:, 1:2], tokens[:, 2:17], *tokens[:, 17:].split(1, dim=1)):
        logits, states = model.step(piece, states)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())  # trains
    loss.backward()
    assert model.blocks[0].attn.in_proj_weight.grad is not None
