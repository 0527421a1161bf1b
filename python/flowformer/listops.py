"""Long Range Arena's ListOps task, generated on the fly (no download): nested expressions of MAX, MIN,
MED (median) and SM (sum modulo 10) over the digits 0-9, written in prefix form with brackets, e.g.
`[MAX 2 9 [MIN 4 7 ] 0 ]` = 9; the label is the value (ten classes). Sequences are token ids padded to
the longest in the batch.
"""

import random
import statistics
from typing import List, Tuple

import torch

OPERATORS = ["[MAX", "[MIN", "[MED", "[SM"]
VOCAB = ["<pad>"] + [str(d) for d in range(10)] + OPERATORS + ["]"]
TOKEN = {name: i for i, name in enumerate(VOCAB)}
NUM_CLASSES = 10


def evaluate(op: str, values: List[int]) -> int:
    if op == "[MAX":
        return max(values)
    if op == "[MIN":
        return min(values)
    if op == "[MED":
        return int(statistics.median_low(values))
    return sum(values) % 10


def expression(rng: random.Random, depth: int, max_args: int, budget: int) -> Tuple[List[str], int]:
    """A random expression of at most `budget` tokens: (tokens, value)."""
    if depth == 0 or budget < 4 or rng.random() < 0.15:
        digit = rng.randrange(10)
        return [str(digit)], digit
    op = rng.choice(OPERATORS)
    tokens, values = [op], []
    budget -= 2  # the operator and the closing bracket
    for _ in range(rng.randint(2, max_args)):
        if budget < 1:
            break
        sub_tokens, value = expression(rng, depth - 1, max_args, rng.randint(1, budget))
        tokens += sub_tokens
        values.append(value)
        budget -= len(sub_tokens)
    tokens.append("]")
    return tokens, evaluate(op, values)


def sample(rng: random.Random, min_len: int, max_len: int, depth: int = 10, max_args: int = 10):
    """One expression of min_len to max_len tokens (retrying until one falls in range): (tokens, label)."""
    while True:
        tokens, value = expression(rng, depth, max_args, max_len)
        if min_len <= len(tokens) <= max_len:
            return tokens, value


def batch(rng: random.Random, size: int, min_len: int, max_len: int):
    """(token ids (size, L) long, padding mask (size, L) bool, labels (size,) long), L the longest."""
    samples = [sample(rng, min_len, max_len) for _ in range(size)]
    L = max(len(tokens) for tokens, _ in samples)
    ids = torch.zeros(size, L, dtype=torch.long)
    for i, (tokens, _) in enumerate(samples):
        ids[i, :len(tokens)] = torch.tensor([TOKEN[t] for t in tokens])
    return ids, ids == TOKEN["<pad>"], torch.tensor([label for _, label in samples])
