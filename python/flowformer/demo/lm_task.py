"""--task lm (the default): three small causal character-level language models (flowformer.nn.FlowformerLM)
identical but for their attention, trained on the Python standard library's own source files
(flowformer.charlm, held out by file). Reports held-out bits per character and next-character accuracy
against the unigram and bigram baselines of the training text, training tokens per second and peak memory.
Then each model writes text one character at a time from its recurrent DecodingState, and the demo
measures the decoding speed and the size of that state as the history grows to --decode-len: fixed for
Flow-Attention and linear attention, growing for softmax attention (its cache of every position's keys
and values).
"""

import json
import math
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as TF

from flowformer import charlm
from flowformer.nn import FlowformerLM

from . import common

DEFAULTS = {"steps": 1000, "batch": 32, "dim": 128, "heads": 4, "layers": 2, "lr": 1e-2, "eval_every": 100}
PROMPT_CHARS = 24  # the sample's prompt: held-out text from the start of a function definition
TEMPERATURE = 0.8  # of the sampling
TIMING_WINDOW = 32  # decoding speed at a history length: from the median time of the last this-many tokens
METRICS = {"bits_per_char": "bits per character", "accuracy": "next-character accuracy"}


def add_arguments(parser) -> None:
    group = parser.add_argument_group("--task lm")
    group.add_argument("--seq-len", type=int, default=64,
                       help="characters per training and held-out window (default: 64)")
    group.add_argument("--eval-chars", type=int, default=32768,
                       help="held-out characters to predict, in windows of --seq-len spread over the held-out "
                            "files (default: 32768)")
    group.add_argument("--decode-len", type=int, default=8192,
                       help="history length the decoding benchmark generates to (default: 8192)")


def size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB" if n_bytes >= 2**20 else f"{n_bytes / 2**10:,.1f} KiB"


def bits(logits, targets):
    """Cross-entropy in bits per character."""
    return TF.cross_entropy(logits.flatten(0, 1), targets.flatten()) / math.log(2)


def evaluate(model, inputs, targets, device, chunk: int) -> dict:
    total_bits = correct = 0.0
    model.eval()
    with torch.no_grad():
        for x, y in zip(inputs.split(chunk), targets.split(chunk)):
            logits = model(x.to(device)).float().cpu()
            total_bits += bits(logits, y).item() * y.numel()
            correct += (logits.argmax(-1) == y).sum().item()
    model.train()
    return {"bits_per_char": total_bits / targets.numel(), "accuracy": correct / targets.numel()}


def prompt(held_out) -> torch.Tensor:
    """PROMPT_CHARS held-out characters from the first function definition past the middle of the text."""
    pattern = charlm.encode("\ndef ")
    found = (held_out[len(held_out) // 2:].unfold(0, len(pattern), 1) == pattern).all(1).nonzero()
    start = len(held_out) // 2 + (int(found[0]) + 1 if len(found) else 0)
    return held_out[start:start + PROMPT_CHARS]


def history_lengths(decode_len: int) -> list:
    """Where the decoding benchmark reports: 128, 256, ... (powers of two) up to decode_len, and decode_len."""
    lengths = [2 ** i for i in range(7, decode_len.bit_length()) if 2 ** i < decode_len]
    return lengths + [decode_len]


def generate(model, prompt_ids, length: int, generator, device) -> dict:
    """Writes after prompt_ids one sampled character at a time from the model's DecodingState, up to a
    history of `length` characters. Returns the generated ids, and at each of history_lengths(length) the
    decoding speed (tokens/s: sampling one character and the step that reads it) and the state's bytes.
    On the CPU it runs on one thread: a batch-1 step is too small to share out, and waiting on a second
    thread that the system has descheduled (another process busy) would cost more than the step."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        return _generate(model, prompt_ids, length, generator, device)
    finally:
        torch.set_num_threads(threads)


def _generate(model, prompt_ids, length: int, generator, device) -> dict:
    lengths = set(history_lengths(length))
    logits, state = model.step(prompt_ids.view(1, -1).to(device))
    generated, times, points = [], [], []
    while state.position < length:
        start = time.perf_counter()
        probs = TF.softmax(logits[0, -1].float().cpu() / TEMPERATURE, -1)
        token = torch.multinomial(probs, 1, generator=generator)
        logits, state = model.step(token.view(1, 1).to(device), state)
        common.synchronize(device)
        times.append(time.perf_counter() - start)
        generated.append(int(token))
        if state.position in lengths:
            points.append({"history": state.position, "state_bytes": state.nbytes(),
                           "tokens_per_s": 1 / statistics.median(times[-TIMING_WINDOW:])})
    return {"generated": generated, "points": points}


def run(args, device: torch.device, out: Path) -> None:
    if args.decode_len < PROMPT_CHARS + TIMING_WINDOW:
        raise SystemExit(f"--decode-len must be at least {PROMPT_CHARS + TIMING_WINDOW}")
    corpus = charlm.load()
    eval_inputs, eval_targets = charlm.evaluation_windows(corpus.held_out, max(1, args.eval_chars // args.seq_len),
                                                          args.seq_len)
    baselines = charlm.baselines(corpus.train, eval_inputs, eval_targets)
    prompt_ids = prompt(corpus.held_out)
    sample_chars = max(0, args.seq_len - PROMPT_CHARS)  # the sample stays within the trained positions
    print(f"Character-level language models on the Python standard library's sources: {len(corpus.train):,} "
          f"training characters ({len(corpus.train_files)} files), {eval_targets.numel():,} held-out characters "
          f"to predict (from {len(corpus.held_out_files)} other files). Baselines on them: unigram "
          f"{baselines['unigram']['bits_per_char']:.2f} bits/char and {baselines['unigram']['accuracy']:.1%} "
          f"(always the most frequent character), bigram {baselines['bigram']['bits_per_char']:.2f} bits/char "
          f"and {baselines['bigram']['accuracy']:.1%}.")
    print(f"{args.steps} steps of {args.batch} windows of {args.seq_len} characters; FlowformerLM d={args.dim}, "
          f"{args.heads} heads, {args.layers} layers; then decoding to a history of {args.decode_len}.\n")
    results = []
    for attention in args.attentions:
        torch.manual_seed(args.seed)
        model = FlowformerLM(charlm.VOCAB_SIZE, d_model=args.dim, nhead=args.heads, num_layers=args.layers,
                             dim_feedforward=4 * args.dim, max_len=max(args.seq_len, args.decode_len),
                             attention=attention).to(device)
        batches = torch.Generator().manual_seed(args.seed)  # the same training windows for every model

        def next_batch():
            inputs, targets = charlm.training_batch(corpus.train, args.batch, args.seq_len, batches)
            return (inputs,), targets, targets.numel()

        name = common.ATTENTIONS[attention]
        result = common.train(model, name, args, device, next_batch, bits,
                              lambda: evaluate(model, eval_inputs, eval_targets, device, 4 * args.batch))
        decoding = generate(model, prompt_ids, args.decode_len, torch.Generator().manual_seed(args.seed), device)
        sample = charlm.decode(prompt_ids) + charlm.decode(decoding["generated"][:sample_chars])
        last = decoding["points"][-1]
        print(f"  {name}: {result['bits_per_char']:.2f} bits/char, {result['accuracy']:.1%} held-out accuracy; "
              f"trained in {result['seconds']:.0f} s; decoding at a history of {last['history']}: "
              f"{last['tokens_per_s']:,.0f} tokens/s, state {size(last['state_bytes'])}. Its text "
              f"(a held-out prompt of {len(prompt_ids)} characters, then its own {sample_chars}):\n{sample}\n")
        results.append({"attention": attention, **result, "decoding": decoding["points"], "sample": sample})
    write_report(out, args, device, results, baselines, eval_targets.numel(), corpus)


def write_report(out: Path, args, device, results, baselines, eval_chars: int, corpus) -> None:
    """lm.md (the tables and samples), lm.json, lm.png (training) and lm-decoding.png."""
    table = common.markdown_table(
        ["attention", "held-out bits/char", "next-char accuracy", "training tokens/s", "peak training memory MiB",
         f"decoding tokens/s at {args.decode_len}", f"state at {args.decode_len}"],
        [[common.ATTENTIONS[r["attention"]], f"{r['bits_per_char']:.2f}", f"{r['accuracy']:.1%}",
          f"{r['tokens_per_s']:,.0f}", f"{r['peak_memory_mib']:.0f}", f"{r['decoding'][-1]['tokens_per_s']:,.0f}",
          size(r["decoding"][-1]["state_bytes"])] for r in results]
        + [[f"{name} baseline", f"{b['bits_per_char']:.2f}", f"{b['accuracy']:.1%}", "", "", "", ""]
           for name, b in baselines.items()])
    decode_table = common.markdown_table(
        ["decoding (tokens/s; state) at a history of"] + [str(p["history"]) for p in results[0]["decoding"]],
        [[common.ATTENTIONS[r["attention"]]] + [f"{p['tokens_per_s']:,.0f}; {size(p['state_bytes'])}"
                                                for p in r["decoding"]] for r in results])
    note = (f"Held out: {eval_chars:,} characters to predict, in windows of {args.seq_len} from "
            f"{len(corpus.held_out_files)} files never trained on; the baselines are count models of the "
            f"{len(corpus.train):,} training characters (the unigram's accuracy: always the most frequent "
            f"character). {common.MEMORY_NOTE} Decoding generates one character at a time (batch 1, sampling "
            f"included; on the CPU on one thread); past the training window of {args.seq_len} the models meet "
            f"positions they never learned, so the samples stop there: the longer histories measure the cost.")
    print(f"{table}\n\n{decode_table}\n\n{note}")
    samples = "\n\n".join(f"{common.ATTENTIONS[r['attention']]}:\n\n```\n{r['sample']}\n```" for r in results)
    (out / "lm.md").write_text(f"# Character-level language models ({device}, torch {torch.__version__})\n\n"
                               f"{table}\n\n{decode_table}\n\n{note}\n\n## Samples\n\n{samples}\n")
    (out / "lm.json").write_text(json.dumps(
        {"args": vars(args), "device": str(device), "held_out_chars": eval_chars,
         "train_chars": len(corpus.train), "train_files": corpus.train_files,
         "held_out_files": corpus.held_out_files, "baselines": baselines, "results": results}, indent=1) + "\n")
    common.plot_training(out / "lm.png", results, "training loss (bits per character)", METRICS, baselines,
                         f"character-level LM: {args.steps} steps, batch {args.batch}, windows of {args.seq_len}, "
                         f"d={args.dim}, {args.layers} layers, {device}")
    plot_decoding(out / "lm-decoding.png", results, device)


def plot_decoding(path: Path, results, device) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        history = [p["history"] for p in r["decoding"]]
        name = common.ATTENTIONS[r["attention"]]
        speed.plot(history, [p["tokens_per_s"] for p in r["decoding"]], marker="o", label=name)
        memory.plot(history, [p["state_bytes"] / 2**10 for p in r["decoding"]], marker="o", label=name)
    speed.set(xscale="log", xlabel="history (characters)", ylabel="tokens/s", title="decoding speed (batch 1)")
    memory.set(xscale="log", yscale="log", xlabel="history (characters)", ylabel="KiB",
               title="attention state (softmax: key/value cache)")
    for ax in (speed, memory):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    speed.set_ylim(bottom=0)
    fig.suptitle(f"generating one character at a time, {device}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
