"""Writes what the C++ examples load, into the folder given as the first argument:

  flowformer.pt2       a small Flowformer classifier (flowformer.nn.Flowformer: Flow-Attention layers)
                       exported with torch.export and compiled by AOTInductor (aoti_compile_and_package)
  tokens.pt            its example input, and expected_logits.pt its output in Python
  flow_attention.pt    a flowformer.nn.FlowAttention module for flowformer::nn::FlowAttention
                       (flowformer.nn.save_for_cpp), with attention_input.pt and expected_attention.pt

    python examples/cpp/export_model.py build/examples
"""

import sys
from pathlib import Path

import torch

import flowformer.nn as fnn
from flowformer import listops


def save_tensor(t, path):
    # A TorchScript-free tensor file that torch::pickle_load reads: torch.save of a one-entry dict.
    torch.save({"tensor": t.contiguous()}, path)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = fnn.Flowformer(len(listops.VOCAB), listops.NUM_CLASSES, d_model=32, nhead=4, num_layers=2,
                           dim_feedforward=64, max_len=128, dropout=0.0, attention="flow").eval()
    tokens = torch.randint(1, len(listops.VOCAB), (2, 40))
    with torch.no_grad():
        expected = model(tokens)
    exported = torch.export.export(model, (tokens,))
    torch._inductor.aoti_compile_and_package(exported, package_path=str(out / "flowformer.pt2"))
    save_tensor(tokens, out / "tokens.pt")
    save_tensor(expected, out / "expected_logits.pt")

    attention = fnn.FlowAttention(16, 4, batch_first=True, clamp=5.0).eval()
    x = torch.randn(2, 11, 16)
    with torch.no_grad():
        expected_attention, _ = attention(x, x, x, need_weights=False, is_causal=True)
    fnn.save_for_cpp(attention, out / "flow_attention.pt")
    save_tensor(x, out / "attention_input.pt")
    save_tensor(expected_attention, out / "expected_attention.pt")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "build/examples"))
