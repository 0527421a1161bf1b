"""The main job: `python -m flowformer.demo` (the README's first command, `make demo`).

Trains three small sequence classifiers (flowformer.nn.Flowformer) on Long Range Arena's ListOps,
generated on the fly (flowformer.listops: nested MAX / MIN / MED / SUM_MOD expressions, up to 2000
tokens, ten classes), identical but for their attention: Flow-Attention, linear attention, and softmax
attention (nn.MultiheadAttention). Reports accuracy on held-out expressions, training tokens per second
and peak memory; writes a PNG plot of the training curves and a markdown results table to --out.
A few minutes on 2 CPU cores with the defaults; on a GPU when present (--device). --steps, --max-len,
--dim, --layers and --batch set the size of the run.
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as TF

import flowformer
from flowformer import listops
from flowformer._measure import peak_rss_growth_mib
from flowformer.nn import Flowformer

ATTENTIONS = {"flow": "Flow-Attention", "linear": "linear attention", "softmax": "softmax (nn.MultiheadAttention)"}


def pick_device(requested: str) -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    cuda = torch.cuda.is_available() and flowformer.cuda_kernels_compiled()
    return torch.device("cuda" if cuda else "cpu")


def progress(label: str, step: int, total: int, loss: float, width: int = 30) -> None:
    done = int(width * step / total)
    sys.stdout.write(f"\r  {label:<34} [{'#' * done}{'.' * (width - done)}] {step}/{total} loss {loss:.3f}")
    sys.stdout.flush()
    if step == total:
        sys.stdout.write("\n")


def evaluate(model, batches, device) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for ids, pad, labels in batches:
            logits = model(ids.to(device), pad.to(device))
            correct += (logits.argmax(-1).cpu() == labels).sum().item()
            total += labels.numel()
    model.train()
    return correct / max(total, 1)


def train(attention: str, args, device, eval_batches):
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)  # the same training expressions for every model
    model = Flowformer(len(listops.VOCAB), listops.NUM_CLASSES, d_model=args.dim, nhead=args.heads,
                       num_layers=args.layers, dim_feedforward=2 * args.dim, max_len=args.max_len,
                       dropout=0.1, attention=attention).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    curve, tokens, seconds = [], 0, 0.0

    def run():
        nonlocal tokens, seconds
        for step in range(1, args.steps + 1):
            ids, pad, labels = listops.batch(rng, args.batch, args.min_len, args.max_len)
            ids, pad, labels = ids.to(device), pad.to(device), labels.to(device)
            start = time.perf_counter()
            loss = TF.cross_entropy(model(ids, pad), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - start
            tokens += int((~pad).sum())
            entry = {"step": step, "loss": loss.item()}
            if step % args.eval_every == 0 or step == args.steps:
                entry["accuracy"] = evaluate(model, eval_batches, device)
            curve.append(entry)
            progress(ATTENTIONS[attention], step, args.steps, loss.item())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        run()
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = peak_rss_growth_mib(run)
    return {"attention": attention, "accuracy": curve[-1]["accuracy"], "tokens_per_s": tokens / seconds,
            "peak_memory_mib": peak, "curve": curve}


def write_plot(path: Path, results, args, device) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        steps = [e["step"] for e in r["curve"]]
        loss_ax.plot(steps, [e["loss"] for e in r["curve"]], label=ATTENTIONS[r["attention"]], alpha=0.8)
        evals = [e for e in r["curve"] if "accuracy" in e]
        acc_ax.plot([e["step"] for e in evals], [e["accuracy"] for e in evals], marker="o",
                    label=ATTENTIONS[r["attention"]])
    loss_ax.set(xlabel="step", ylabel="training loss", title="ListOps: training loss")
    acc_ax.set(xlabel="step", ylabel="held-out accuracy", title="ListOps: accuracy (10 classes)")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{args.steps} steps, batch {args.batch}, lengths {args.min_len}-{args.max_len}, d={args.dim}, "
                 f"{args.layers} layers, {device}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    parser.add_argument("--attentions", default="flow,linear,softmax")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--min-len", type=int, default=500)
    parser.add_argument("--max-len", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="demo-out", help="folder for listops.png, listops.md, listops.json")
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    print(f"flowformer {flowformer.__version__} | torch {torch.__version__} | device {device} | "
          f"{torch.get_num_threads()} CPU threads | build {flowformer.build_info()}")
    print(f"ListOps: {args.steps} steps of {args.batch} expressions of {args.min_len}-{args.max_len} tokens; "
          f"Flowformer d={args.dim}, {args.heads} heads, {args.layers} layers\n")
    held_out = random.Random(args.seed + 1)
    eval_batches = [listops.batch(held_out, args.batch, args.min_len, args.max_len) for _ in range(args.eval_batches)]
    results = [train(a, args, device, eval_batches) for a in args.attentions.split(",")]

    lines = ["| attention | held-out accuracy | training tokens/s | peak memory MiB |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {ATTENTIONS[r['attention']]} | {r['accuracy']:.1%} | {r['tokens_per_s']:,.0f} | "
                     f"{r['peak_memory_mib']:.0f} |")
    table = "\n".join(lines)
    print("\n" + table)
    print(f"\n(chance: 10%; the most frequent class in ListOps is near 20%. Accuracy needs far longer runs "
          f"than this demo's default to separate the models: try --steps 2000.)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "listops.md").write_text(f"# ListOps demo ({device}, torch {torch.__version__})\n\n{table}\n")
    (out / "listops.json").write_text(json.dumps({"args": vars(args), "device": str(device), "results": results},
                                                 indent=1) + "\n")
    write_plot(out / "listops.png", results, args, device)
    print(f"results and plot in {out}/")


if __name__ == "__main__":
    main()
