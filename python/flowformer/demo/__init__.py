"""The main job: `python -m flowformer.demo` (the README's first command, `make demo`).

Trains three small models identical but for their attention: Flow-Attention, linear attention and
softmax attention (nn.MultiheadAttention), and shows what each learns, how fast it trains and how much
memory it takes. Writes a markdown table, JSON and PNG plots to --out. On a GPU when present (--device).

--task lm (the default; about 5 minutes on 2 CPU cores): causal character-level language models
(flowformer.nn.FlowformerLM) on the Python standard library's own source files, with held-out bits per
character and next-character accuracy against unigram and bigram baselines; then each model generates
text one character at a time from its recurrent state, and the decoding speed and the state's memory
are measured as the history grows (softmax attention: a key/value cache that grows with it).

--task listops: sequence classifiers (flowformer.nn.Flowformer) on Long Range Arena's ListOps, the
paper's task; it learns slowly: for long runs (--steps 2000 and more).

--steps, --batch, --dim, --heads, --layers and the task's own flags set the size of the run.
"""

import argparse
import time
from pathlib import Path

import torch

import flowformer

from . import common, listops_task, lm_task

TASKS = {"lm": lm_task, "listops": listops_task}
SHARED = {"steps": (int, "training steps"), "batch": (int, "sequences per step"),
          "dim": (int, "model width d_model"), "heads": (int, "attention heads"), "layers": (int, "layers"),
          "lr": (float, "peak learning rate (AdamW, warm-up, cosine decay)"),
          "eval_every": (int, "steps between held-out evaluations")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flowformer.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="lm", help="what to train (default: lm)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    parser.add_argument("--attentions", default="flow,linear,softmax",
                        help="comma-separated, from flow, linear, softmax (default: all three)")
    for name, (kind, text) in SHARED.items():
        defaults = ", ".join(f"{task.DEFAULTS[name]} for {key}" for key, task in TASKS.items())
        parser.add_argument("--" + name.replace("_", "-"), type=kind, help=f"{text} (default: {defaults})")
    parser.add_argument("--seed", type=int, default=0, help="of the initialisation, data and sampling (default: 0)")
    parser.add_argument("--out", default="demo-out",
                        help="folder for the results: <task>.md, <task>.json, <task>.png, and for lm "
                             "lm-decoding.png (default: demo-out)")
    for task in TASKS.values():
        task.add_arguments(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The flags; those left out take the --task's defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, value in TASKS[args.task].DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.attentions = args.attentions.split(",")
    unknown = set(args.attentions) - set(common.ATTENTIONS)
    if unknown:
        parser.error(f"--attentions: unknown {sorted(unknown)}; choose from {list(common.ATTENTIONS)}")
    return args


def main(argv=None) -> None:
    start = time.perf_counter()
    args = parse_args(argv)
    device = common.pick_device(args.device)
    print(f"flowformer {flowformer.__version__} | torch {torch.__version__} | device {device} | "
          f"{torch.get_num_threads()} CPU threads | build {flowformer.build_info()}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    TASKS[args.task].run(args, device, out)
    print(f"results and plots in {out}/ ({time.perf_counter() - start:.0f} s in all)")
