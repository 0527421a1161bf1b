"""--task listops: three sequence classifiers (flowformer.nn.Flowformer) identical but for their attention,
trained on Long Range Arena's ListOps generated on the fly (flowformer.listops: nested MAX / MIN / MED /
SUM_MOD expressions of --min-len to --max-len tokens, ten classes). Reports held-out accuracy against
the majority class, training tokens per second and peak memory. The paper's task; it learns slowly, so
the default run shows speed and memory, and accuracy needs long runs (--steps 2000 and more).
"""

import json
import random
from pathlib import Path

import torch
from torch.nn import functional as TF

from flowformer import listops
from flowformer.nn import Flowformer

from . import common

DEFAULTS = {"steps": 40, "batch": 4, "dim": 64, "heads": 4, "layers": 2, "lr": 1e-3, "eval_every": 20}


def add_arguments(parser) -> None:
    group = parser.add_argument_group("--task listops")
    group.add_argument("--min-len", type=int, default=500, help="shortest expression, tokens (default: 500)")
    group.add_argument("--max-len", type=int, default=2000, help="longest expression, tokens (default: 2000)")
    group.add_argument("--eval-batches", type=int, default=8,
                       help="held-out expressions: this many batches of --batch (default: 8)")


def accuracy(model, batches, device) -> float:
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for ids, pad, labels in batches:
            correct += (model(ids.to(device), pad.to(device)).argmax(-1).cpu() == labels).sum().item()
            total += labels.numel()
    model.train()
    return correct / total


def run(args, device: torch.device, out: Path) -> None:
    print(f"ListOps: {args.steps} steps of {args.batch} expressions of {args.min_len}-{args.max_len} tokens; "
          f"Flowformer d={args.dim}, {args.heads} heads, {args.layers} layers\n")
    held_out = random.Random(args.seed + 1)
    eval_batches = [listops.batch(held_out, args.batch, args.min_len, args.max_len) for _ in range(args.eval_batches)]
    eval_labels = torch.cat([labels for _, _, labels in eval_batches])
    majority = eval_labels.bincount(minlength=listops.NUM_CLASSES).max().item() / len(eval_labels)
    results = []
    for attention in args.attentions:
        torch.manual_seed(args.seed)
        rng = random.Random(args.seed)  # the same training expressions for every model
        model = Flowformer(len(listops.VOCAB), listops.NUM_CLASSES, d_model=args.dim, nhead=args.heads,
                           num_layers=args.layers, dim_feedforward=2 * args.dim, max_len=args.max_len,
                           dropout=0.1, attention=attention).to(device)

        def next_batch():
            ids, pad, labels = listops.batch(rng, args.batch, args.min_len, args.max_len)
            return (ids, pad), labels, int((~pad).sum())

        result = common.train(model, common.ATTENTIONS[attention], args, device, next_batch, TF.cross_entropy,
                              lambda: {"accuracy": accuracy(model, eval_batches, device)})
        results.append({"attention": attention, **result})

    table = common.markdown_table(
        ["attention", "held-out accuracy", "training tokens/s", "peak memory MiB"],
        [[common.ATTENTIONS[r["attention"]], f"{r['accuracy']:.1%}", f"{r['tokens_per_s']:,.0f}",
          f"{r['peak_memory_mib']:.0f}"] for r in results])
    note = (f"Held out: {len(eval_labels)} expressions; the most frequent class among them is {majority:.1%} "
            f"(chance 10%). ListOps learns slowly: accuracy needs far longer runs than the default "
            f"(--steps 2000 and more) to move away from the majority class. {common.MEMORY_NOTE}")
    print(f"\n{table}\n\n{note}")
    (out / "listops.md").write_text(f"# ListOps demo ({device}, torch {torch.__version__})\n\n{table}\n\n{note}\n")
    (out / "listops.json").write_text(json.dumps(
        {"args": vars(args), "device": str(device), "held_out_expressions": len(eval_labels),
         "majority_class_accuracy": majority, "results": results}, indent=1) + "\n")
    common.plot_training(out / "listops.png", results, "training loss (cross-entropy)", {"accuracy": "accuracy"},
                         {"majority-class": {"accuracy": majority}},
                         f"ListOps: {args.steps} steps, batch {args.batch}, lengths {args.min_len}-{args.max_len}, "
                         f"d={args.dim}, {args.layers} layers, {device}")
