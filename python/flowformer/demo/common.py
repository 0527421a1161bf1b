"""What the demo's tasks share: the device, the training loop (a tqdm progress bar, training tokens per
second, peak memory, held-out metrics along the way), the markdown tables and the plot of the training
curves, speed and memory."""

import math
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from tqdm import tqdm

import flowformer
from flowformer._measure import peak_rss_growth_mib, unmap_freed_blocks

ATTENTIONS = {"flow": "Flow-Attention", "linear": "linear attention", "softmax": "softmax attention"}
MEMORY_NOTE = ("Peak training memory: how far the training steps after the first raise the memory (activations "
               "and gradients): the process's resident memory on the CPU, the CUDA allocator's peak on a GPU.")


def pick_device(requested: str) -> torch.device:
    """`requested`, or for "auto" the GPU when there is one and this build has the CUDA kernels."""
    if requested != "auto":
        return torch.device(requested)
    cuda = torch.cuda.is_available() and flowformer.cuda_kernels_compiled()
    return torch.device("cuda" if cuda else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Runs fn() and returns how far it raised the memory in MiB: the peak of the CUDA allocator on a GPU,
    the process's resident memory on the CPU (with freed blocks of 1 MiB and more returned to the system,
    so that memory another model left behind is not reused unseen)."""
    if device.type != "cuda":
        unmap_freed_blocks()
        return peak_rss_growth_mib(fn)
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def warmup_cosine(step: int, steps: int) -> float:
    """The learning-rate factor at `step`: a linear warm-up over the first tenth of the steps, then a
    cosine decay to a tenth of the rate."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def train(model, label: str, args, device: torch.device, next_batch: Callable, loss_fn: Callable,
          evaluate: Callable[[], Dict[str, float]]) -> dict:
    """Trains `model` for args.steps steps of AdamW (peak rate args.lr, warmup_cosine, gradients clipped
    to norm 1). next_batch() -> (inputs, targets, tokens): model(*inputs) is scored by
    loss_fn(output, targets); tokens counts the tokens it holds. evaluate() -> held-out metrics, before
    the first step, every args.eval_every steps and after the last.

    Returns {"curve": [{"step", "loss" (not at step 0), metrics...}], "tokens_per_s" (of the training
    steps alone: batches and evaluations left out), "peak_memory_mib" (how far the steps after the first
    raise the memory: activations and gradients; the first step, which also creates the optimiser's
    state and loads code, is left out), "seconds" (all of it), and the final metrics}."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, args.steps))
    bar = tqdm(total=args.steps, desc=f"  {label}", unit="step", disable=None)
    tokens, seconds = 0, 0.0

    def report(entry):  # above the bar, or alone where there is no terminal for one
        tqdm.write(f"  {label:<18} step {entry['step']:>5}: "
                   + ", ".join(f"{name} {value:.3g}" for name, value in entry.items() if name != "step"))

    def run(first: int, last: int):
        nonlocal tokens, seconds
        for step in range(first, last + 1):
            inputs, targets, batch_tokens = next_batch()
            inputs = [t.to(device) for t in inputs]
            targets = targets.to(device)
            start = time.perf_counter()
            loss = loss_fn(model(*inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            synchronize(device)
            seconds += time.perf_counter() - start
            tokens += batch_tokens
            entry = {"step": step, "loss": loss.item()}
            if step % args.eval_every == 0 or step == args.steps:
                entry.update(evaluate())
                report(entry)
            curve.append(entry)
            bar.update()
            bar.set_postfix({name: f"{value:.3g}" for name, value in entry.items() if name != "step"})

    start = time.perf_counter()
    curve = [{"step": 0, **evaluate()}]
    report(curve[0])
    model.train()
    run(1, 1)
    peak = peak_memory_mib(lambda: run(2, args.steps), device)
    bar.close()
    model.eval()
    metrics = {name: value for name, value in curve[-1].items() if name not in ("step", "loss")}
    return {"curve": curve, "tokens_per_s": tokens / seconds, "peak_memory_mib": peak,
            "seconds": time.perf_counter() - start, **metrics}


def markdown_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def smoothed(values: List[float], weight: float = 0.9) -> List[float]:
    """An exponential moving average with bias correction (as TensorBoard draws training curves)."""
    average, out = 0.0, []
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i))
    return out


def pyplot():
    """matplotlib.pyplot drawing to files, or None (with a note) where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_training(path: Path, results: List[dict], loss_label: str, metrics: Dict[str, str],
                  baselines: Dict[str, Dict[str, float]], title: str) -> None:
    """Top row: the training loss (faint: each step; solid: smoothed) and each held-out metric (metrics:
    key -> axis label) against the step, baselines (name -> {key: value}) as dashed lines; bottom row:
    training tokens per second and peak memory per attention."""
    plt = pyplot()
    if plt is None:
        return
    columns = max(2, 1 + len(metrics))
    fig, axes = plt.subplots(2, columns, figsize=(4.2 * columns, 7), squeeze=False)
    names = [ATTENTIONS[r["attention"]] for r in results]
    for r, name, color in zip(results, names, ("C0", "C1", "C2")):
        trained = r["curve"][1:]
        steps = [e["step"] for e in trained]
        axes[0][0].plot(steps, [e["loss"] for e in trained], color=color, alpha=0.2)
        axes[0][0].plot(steps, smoothed([e["loss"] for e in trained]), color=color, label=name)
        for ax, key in zip(axes[0][1:], metrics):
            evals = [e for e in r["curve"] if key in e]
            ax.plot([e["step"] for e in evals], [e[key] for e in evals], marker="o", color=color, label=name)
    axes[0][0].set(xlabel="step", ylabel=loss_label, title="training loss")
    for ax, (key, axis_label) in zip(axes[0][1:], metrics.items()):
        for (baseline, values), style in zip(baselines.items(), ("--", ":")):
            if key in values:
                ax.axhline(values[key], color="gray", linestyle=style, label=f"{baseline} baseline")
        ax.set(xlabel="step", ylabel=axis_label, title=f"held-out {axis_label}")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    colors = ["C0", "C1", "C2"][:len(results)]
    for ax, key, axis_label in ((axes[1][0], "tokens_per_s", "training tokens/s"),
                                (axes[1][1], "peak_memory_mib", "peak training memory (MiB)")):
        bars = ax.bar(names, [r[key] for r in results], color=colors)
        ax.bar_label(bars, fmt="{:,.0f}", fontsize=8)
        ax.set(ylabel=axis_label, title=axis_label)
        ax.tick_params(axis="x", labelsize=8)
    for ax in axes[1][2:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
