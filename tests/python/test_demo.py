"""The demo (`python -m flowformer.demo`) at a tiny size for each task, its flags, and the character-level
language-modelling data (flowformer.charlm)."""

import json
import math
import zlib

import pytest
import torch

from flowformer import charlm, demo


def test_charlm_split_is_by_file_deterministic_and_disjoint():
    first, second = charlm.load(), charlm.load()
    assert first.train_files == second.train_files and first.held_out_files == second.held_out_files
    assert torch.equal(first.train, second.train) and torch.equal(first.held_out, second.held_out)
    names = [p.name for p in charlm.source_files()]
    assert names == sorted(names) and sorted(first.train_files + first.held_out_files) == sorted(names)
    assert not set(first.train_files) & set(first.held_out_files)
    assert first.held_out_files == [n for n in names if zlib.crc32(n.encode()) % 10 == 0]
    assert 0 < len(first.held_out) < len(first.train)
    assert len(first.held_out) > 100_000  # enough for the default evaluation windows, spread out


def test_charlm_reads_the_files_of_each_side_in_order(tmp_path):
    texts = {f"m{i:02d}.py": f"# module {i}\nx = {i}\n" for i in range(40)}
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "notes.txt").write_text("not python")
    corpus = charlm.load(str(tmp_path))
    held_out = [n for n in sorted(texts) if zlib.crc32(n.encode()) % 10 == 0]
    assert held_out and corpus.held_out_files == held_out
    assert charlm.decode(corpus.held_out) == "".join(texts[n] for n in held_out)
    assert charlm.decode(corpus.train) == "".join(texts[n] for n in sorted(texts) if n not in held_out)


def test_charlm_encoding():
    text = "def f(x):\n\treturn x ~ 1  # \u00e9\u4e2d\r"
    ids = charlm.encode(text)
    assert ids.dtype == torch.long and len(ids) == len(text)
    assert (ids[-3:] == charlm.OTHER).all() and (ids[:-3] < charlm.OTHER).all()
    assert charlm.decode(ids) == text[:-3] + "\ufffd" * 3
    assert charlm.VOCAB_SIZE == 98 and len(set(charlm.VOCAB)) == 97


def test_charlm_windows():
    data = torch.arange(1000) % charlm.VOCAB_SIZE
    g = torch.Generator().manual_seed(0)
    inputs, targets = charlm.training_batch(data, 5, 16, g)
    assert inputs.shape == targets.shape == (5, 16)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.equal(targets, (inputs + 1) % charlm.VOCAB_SIZE)  # consecutive characters of `data`
    again = charlm.training_batch(data, 5, 16, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], inputs)
    inputs, targets = charlm.evaluation_windows(torch.arange(1000), 10, 20)
    assert inputs.shape == (10, 20) and inputs[0, 0] == 0 and targets[-1, -1] == 999
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert (inputs[1:, 0] - inputs[:-1, 0] >= 20).all()  # spread out, not overlapping
    with pytest.raises(ValueError, match="need more than"):
        charlm.evaluation_windows(torch.arange(100), 10, 20)


def test_charlm_baselines():
    train = charlm.encode("ab" * 50 + "a")  # 51 a, 50 b
    inputs, targets = charlm.encode("abab"), charlm.encode("baba")
    b = charlm.baselines(train, inputs, targets)
    V = charlm.VOCAB_SIZE
    p_a, p_b = 52 / (101 + V), 51 / (101 + V)  # add-one smoothing
    assert b["unigram"]["bits_per_char"] == pytest.approx(-(math.log2(p_a) + math.log2(p_b)) / 2)
    assert b["unigram"]["accuracy"] == 0.5  # always "a"
    # 50 times "ab" and 50 times "ba": each row counts 50 + 1 of its 50 + V.
    assert b["bigram"]["bits_per_char"] == pytest.approx(-math.log2(51 / (50 + V)))
    assert b["bigram"]["accuracy"] == 1.0


def test_every_flag_is_documented_and_takes_its_task_defaults():
    for action in demo.build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"
    lm, listops = demo.parse_args([]), demo.parse_args(["--task", "listops", "--steps", "7"])
    assert lm.task == "lm" and lm.steps == demo.lm_task.DEFAULTS["steps"] and lm.attentions == ["flow", "linear",
                                                                                                    "softmax"]
    assert listops.steps == 7 and listops.dim == demo.listops_task.DEFAULTS["dim"]
    with pytest.raises(SystemExit):
        demo.parse_args(["--attentions", "flow,sparse"])


def test_demo_lm_runs_end_to_end_at_a_tiny_size(tmp_path):
    demo.main(["--steps", "3", "--batch", "4", "--seq-len", "64", "--dim", "16", "--layers", "1", "--eval-every", "2",
               "--eval-chars", "512", "--decode-len", "256", "--device", "cpu", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "lm.json").read_text())
    assert report["held_out_chars"] == 512
    results = report["results"]
    assert [r["attention"] for r in results] == ["flow", "linear", "softmax"]
    for r in results:
        assert [e["step"] for e in r["curve"] if "bits_per_char" in e] == [0, 2, 3]
        assert 0 < r["bits_per_char"] < 10 and 0 <= r["accuracy"] <= 1 and r["tokens_per_s"] > 0
        assert [p["history"] for p in r["decoding"]] == [128, 256]
        assert all(p["tokens_per_s"] > 0 for p in r["decoding"])
        assert r["sample"].startswith("def ") and len(r["sample"]) == 64
    assert 0 < report["baselines"]["bigram"]["bits_per_char"] < report["baselines"]["unigram"]["bits_per_char"]
    flow, linear, softmax = ([p["state_bytes"] for p in r["decoding"]] for r in results)
    assert flow[0] == flow[1] and linear[0] == linear[1] and softmax[1] == 2 * softmax[0]
    for name in ("lm.md", "lm.png", "lm-decoding.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_demo_listops_runs_end_to_end_at_a_tiny_size(tmp_path):
    demo.main(["--task", "listops", "--steps", "2", "--min-len", "10", "--max-len", "40", "--batch", "4", "--dim",
               "16", "--eval-every", "1", "--eval-batches", "1", "--device", "cpu", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "listops.json").read_text())
    assert report["held_out_expressions"] == 4 and 0.25 <= report["majority_class_accuracy"] <= 1
    results = report["results"]
    assert [r["attention"] for r in results] == ["flow", "linear", "softmax"]
    assert all(0 <= r["accuracy"] <= 1 and r["tokens_per_s"] > 0 for r in results)
    assert all([e["step"] for e in r["curve"]] == [0, 1, 2] for r in results)
    assert (tmp_path / "listops.md").exists() and (tmp_path / "listops.png").exists()
