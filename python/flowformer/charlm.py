"""Character-level language-modelling text that every machine has: the Python standard library's own
source files (the top-level *.py files of sysconfig's "stdlib" path, in sorted order), split by file
into training and held-out text. A file is held out when the CRC-32 of its name is 0 modulo 10: a fixed
choice (about a tenth of the files) that does not depend on which other files exist. Characters are the
tokens: tab, newline and the 95 printable ASCII characters have their own ids; every other character
shares the id OTHER.
"""

import sysconfig
import zlib
from pathlib import Path
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

VOCAB = "\t\n" + "".join(chr(c) for c in range(32, 127))
OTHER = len(VOCAB)  # the id of every character outside VOCAB
VOCAB_SIZE = len(VOCAB) + 1
_IDS = torch.full((128,), OTHER, dtype=torch.long)
_IDS[[ord(c) for c in VOCAB]] = torch.arange(len(VOCAB))


class Corpus(NamedTuple):
    """The token ids of the training and the held-out files, each file's text after the previous one's."""
    train: Tensor
    held_out: Tensor
    train_files: List[str]
    held_out_files: List[str]


def source_files(stdlib: Optional[str] = None) -> List[Path]:
    """The top-level .py files of the standard library (or of the folder `stdlib`), sorted by name."""
    return sorted(Path(stdlib or sysconfig.get_paths()["stdlib"]).glob("*.py"))


def is_held_out(path: Path) -> bool:
    return zlib.crc32(path.name.encode()) % 10 == 0


def encode(text: str) -> Tensor:
    """The token ids (1-D long) of `text`."""
    points = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()
    return torch.where(points < 128, _IDS[points.clamp(max=127)], OTHER)


def decode(ids) -> str:
    """The text of token ids; OTHER shows as U+FFFD."""
    return "".join(VOCAB[i] if i < OTHER else "\ufffd" for i in map(int, ids))


def load(stdlib: Optional[str] = None) -> Corpus:
    files = source_files(stdlib)
    if not files:
        raise RuntimeError(f"no .py files in {stdlib or sysconfig.get_paths()['stdlib']}")
    parts = {True: [], False: []}
    for path in files:
        parts[is_held_out(path)].append(path)

    def read(paths):
        return encode("".join(p.read_text(encoding="utf-8", errors="replace") for p in paths))

    return Corpus(read(parts[False]), read(parts[True]), [p.name for p in parts[False]],
                  [p.name for p in parts[True]])


def training_batch(data: Tensor, batch: int, seq_len: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """`batch` windows of seq_len + 1 characters at random places of `data`: (inputs, targets), each
    (batch, seq_len), the targets being the inputs shifted by one character."""
    starts = torch.randint(0, len(data) - seq_len, (batch, 1), generator=generator)
    windows = data[starts + torch.arange(seq_len + 1)]
    return windows[:, :-1], windows[:, 1:]


def evaluation_windows(data: Tensor, count: int, seq_len: int) -> Tuple[Tensor, Tensor]:
    """`count` windows spread evenly over `data` (the same every time): (inputs, targets), each
    (count, seq_len); count * seq_len characters to predict."""
    if count * (seq_len + 1) > len(data):
        raise ValueError(f"{count} windows of {seq_len + 1} characters need more than the {len(data)} held out")
    starts = torch.linspace(0, len(data) - seq_len - 1, count).long().unsqueeze(1)
    windows = data[starts + torch.arange(seq_len + 1)]
    return windows[:, :-1], windows[:, 1:]


def baselines(train: Tensor, inputs: Tensor, targets: Tensor) -> dict:
    """Bits per character and next-character accuracy on (inputs, targets) of two count-based predictors
    fitted on the training text with add-one smoothing: the unigram (the characters' frequencies; its
    accuracy is that of always predicting the most frequent character) and the bigram (the next
    character given the current one)."""
    V = VOCAB_SIZE
    unigram = torch.bincount(train, minlength=V).double() + 1
    unigram /= unigram.sum()
    bigram = torch.bincount(train[:-1] * V + train[1:], minlength=V * V).double().view(V, V) + 1
    bigram /= bigram.sum(1, keepdim=True)
    return {
        "unigram": {"bits_per_char": -unigram[targets].log2().mean().item(),
                    "accuracy": (targets == unigram.argmax()).double().mean().item()},
        "bigram": {"bits_per_char": -bigram[inputs, targets].log2().mean().item(),
                   "accuracy": (bigram.argmax(1)[inputs] == targets).double().mean().item()},
    }
