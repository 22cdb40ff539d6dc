"""train_probe.py: CLI, the checkpoint metrics.load_probe reads, metrics.json, determinism,
label-consistent augmentation and frame shuffling, the learning-rate curve, bad input."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tyro

import metrics as M
import toy_data as td
import train_probe as tp

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model: more threads only contend
# 5 steps: the speed meter leaves out the first 3, so metrics.json has a training speed
TINY = [
    "--steps",
    "5",
    "--n-per-kind",
    "2",
    "--batch-size",
    "8",
    "--log-every",
    "2",
    "--device",
    "cpu",
    "--no-compile",
    "--threads",
    "1",
]


def run(out, *extra):
    tp.main(tyro.cli(tp.Args, args=[*TINY, "--out", str(out), *extra]))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    n = torch.get_num_threads()  # main() sets --threads for the whole process
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A probe trained for a few steps: checks the plumbing, not the accuracy."""
    path = tmp_path_factory.mktemp("probe") / "probe.pt"
    run(path)
    return path


# ----------------------------------------------------------------------------- CLI and outputs
def test_help_shows_field_docs():
    r = subprocess.run(
        [sys.executable, "train_probe.py", "--help"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    for text in (
        "--steps",
        "--out",
        "--n-per-kind",
        "--batch-size",
        "--lr",
        "--eval-only",
        "--compile, --no-compile",
        "--threads",
        "(default: float32)",
        "defines a metric",
    ):
        assert text in r.stdout


def test_tiny_run_writes_the_probe_metrics_load(tiny):
    ck = load(tiny)
    assert ck["script"] == "train_probe.py" and ck["format"] == M.PROBE_FORMAT
    assert ck["labels"]["color"] == list(td.COLORS) and ck["labels"]["kind"] == list(M.PROBE_KINDS)
    assert set(td.DIRECTIONS) | set(td.ROTATIONS) | {"bouncing", "none"} == set(
        ck["labels"]["motion"]
    )
    assert set(ck["accuracy"]) == set(ck["labels"]) and ck["steps"] == 5 and ck["seed"] == 0
    assert all(0 <= a <= 1 for a in ck["accuracy"].values())
    assert ck["args"]["n_per_kind"] == 2 and ck["args"]["dtype"] == "float32"
    probe = M.load_probe(str(tiny))
    assert probe.accuracy == ck["accuracy"] and not probe.training
    v = td.ToyDataset(3, seed=0, split="test")
    assert M.probe_features([v[i]["video"] for i in range(3)], str(tiny)).shape == (3, 64)
    m = json.loads((tiny.parent / "metrics.json").read_text())
    assert m["script"] == "train_probe.py" and m["step"] == 5 and m["wall_s"] > 0
    assert m["eval"] == ck["accuracy"]
    assert m["perf"]["train_samples_per_s"] > 0 and m["perf"]["mfu"] is None  # no peak on CPU
    assert m["perf"]["params"] == sum(p.numel() for p in probe.parameters())
    # 2 per kind (8 shapes) to train, at least 4 per kind (16 shapes) held out
    assert m["data"] == {"kinds": list(M.PROBE_KINDS), "n_train": 20, "n_eval": 40}


def test_same_seed_same_weights(tiny, tmp_path):
    run(tmp_path / "again" / "probe.pt")
    run(tmp_path / "seed1" / "probe.pt", "--seed", "1")
    a = load(tiny)
    b = load(tmp_path / "again" / "probe.pt")
    c = load(tmp_path / "seed1" / "probe.pt")
    assert a["state_dict"].keys() == b["state_dict"].keys() == c["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["accuracy"] == b["accuracy"]
    assert not all(torch.equal(a["state_dict"][k], c["state_dict"][k]) for k in a["state_dict"])


def test_eval_only_rewrites_metrics_json(tiny, tmp_path):
    path = tmp_path / "probe.pt"
    shutil.copy(tiny, path)
    run(path, "--eval-only")
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["script"] == "train_probe.py" and m["step"] == 5
    assert set(m["eval"]) == set(load(tiny)["labels"]) and m["data"]["n_eval"] == 40
    # the same weights and held-out videos: only 'shuffled' draws its shuffles anew
    want = {k: v for k, v in load(tiny)["accuracy"].items() if k != "shuffled"}
    assert {k: v for k, v in m["eval"].items() if k != "shuffled"} == want


def test_bad_input_stops_with_one_line(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="does not exist"):
        run(tmp_path / "none.pt", "--eval-only")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a readable probe"):
        run(bad, "--eval-only")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="one process"):
        run(tmp_path / "ddp.pt")
    assert not (tmp_path / "ddp.pt").exists()


# ----------------------------------------------------------------------------- the method
def test_augment_keeps_labels_consistent():
    labels = tp.probe_labels()
    rev, mir = tp.label_maps(labels)
    name = {m: labels["motion"][int(rev[i])] for i, m in enumerate(labels["motion"])}
    assert name["left_to_right"] == "right_to_left" and name["clockwise"] == "counter-clockwise"
    assert name["bouncing"] == "bouncing" and name["none"] == "none"
    assert (
        labels["motion"][int(mir[labels["motion"].index("top_left_to_bottom_right")])]
        == "top_right_to_bottom_left"
    )
    assert labels["motion"][int(mir[labels["motion"].index("top_to_bottom")])] == "top_to_bottom"
    n = 64
    x0 = torch.rand(n, 3, 16, 8, 8)
    y0 = {
        "motion": torch.full((n,), labels["motion"].index("left_to_right")),
        "color": torch.full((n,), 0),
        "color_to": torch.full((n,), 1),
    }
    x, y = x0.clone(), {k: v.clone() for k, v in y0.items()}
    tp.augment(x, y, (rev, mir), torch.ones(n, dtype=torch.bool), torch.Generator().manual_seed(0))
    for i in range(n):
        reversed_ = torch.equal(x[i], x0[i].flip(1)) or torch.equal(x[i], x0[i].flip(1).flip(-1))
        mirrored = torch.equal(x[i], x0[i].flip(-1)) or torch.equal(x[i], x0[i].flip(1).flip(-1))
        want = "left_to_right" if reversed_ == mirrored else "right_to_left"
        assert labels["motion"][int(y["motion"][i])] == want
        assert (int(y["color"][i]), int(y["color_to"][i])) == ((1, 0) if reversed_ else (0, 1))
    assert 0 < int((y["color"] == 1).sum()) < n  # both branches were exercised


def test_shuffle_some_labels_what_it_shuffles():
    n = 200
    x0 = torch.arange(16.0).view(1, 1, 16, 1, 1).expand(n, 3, 16, 2, 2).clone()
    y = {k: torch.zeros(n, dtype=torch.long) for k in ("shuffled", "type", "motion", "kind")}
    x = x0.clone()
    tp.shuffle_some(x, y, torch.Generator().manual_seed(0))
    moved = (x != x0).flatten(1).any(1)
    assert torch.equal(y["shuffled"] == 1, moved) and 20 < int(moved.sum()) < 80  # ~ a quarter
    assert (y["type"][moved] == -100).all() and (y["motion"][moved] == -100).all()
    assert (y["type"][~moved] == 0).all() and (y["kind"] == 0).all()
    assert torch.equal(x.sort(2).values, x0)  # frames permuted, not changed


def test_probe_loss_skips_heads_without_labels():
    logits = {"a": torch.randn(4, 3), "b": torch.randn(4, 2)}
    y = {"a": torch.tensor([0, 2, -100, 1]), "b": torch.full((4,), -100)}
    keep = y["a"] != -100
    want = torch.nn.functional.cross_entropy(logits["a"][keep], y["a"][keep])
    assert torch.allclose(tp.probe_loss(logits, y), want)


def test_lr_warms_up_then_decays_to_zero():
    peak, total = 2.0, 100  # warm-up over total / 20 = 5 steps
    assert tp.probe_lr(0, total, peak) == pytest.approx(peak / 5)
    assert tp.probe_lr(4, total, peak) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 0.04)))
    assert tp.probe_lr(50, total, peak) == pytest.approx(peak * 0.5)
    assert tp.probe_lr(total - 1, total, peak) < 1e-3 * peak
