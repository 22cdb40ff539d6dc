"""train_probe.py: CLI, the checkpoint metrics.load_probe reads, metrics.json, determinism,
label-consistent augmentation and frame shuffling, the learning-rate curve, bad input."""

import json
import math
import os
import shutil
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import tyro
from conftest import assert_flop_rate

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
    assert m["perf"]["train_samples_per_s"] > 0
    assert_flop_rate(m["perf"])
    assert m["perf"]["params"] == sum(p.numel() for p in probe.parameters())
    # 2 per kind (8 shapes) to train, at least 4 per kind (16 shapes) held out
    assert m["data"] == {"kinds": list(M.PROBE_KINDS), "n_train": 20, "split": "test", "n_eval": 40}


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


# ------------------------------------------------- the method against hand-written references
# The vocabulary written out here, not read from the script: indices below are hand-computed.
KINDS = ["shapes", "bouncing_balls", "pendulum", "falling", "projectile", "moving_mnist", "smoke"]
TYPES = ["moving", "rotating", "color_transition", "bouncing"]
SHAPES = ["circle", "square", "triangle"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "white"]
MOTIONS = [
    "left_to_right",
    "right_to_left",
    "top_to_bottom",
    "bottom_to_top",
    "top_left_to_bottom_right",
    "bottom_right_to_top_left",
    "top_right_to_bottom_left",
    "bottom_left_to_top_right",
    "clockwise",
    "counter-clockwise",
    "bouncing",
    "none",
]
# a clip played backwards / mirrored left-right: what its motion label must become
BACKWARDS = {
    "left_to_right": "right_to_left",
    "right_to_left": "left_to_right",
    "top_to_bottom": "bottom_to_top",
    "bottom_to_top": "top_to_bottom",
    "top_left_to_bottom_right": "bottom_right_to_top_left",
    "bottom_right_to_top_left": "top_left_to_bottom_right",
    "top_right_to_bottom_left": "bottom_left_to_top_right",
    "bottom_left_to_top_right": "top_right_to_bottom_left",
    "clockwise": "counter-clockwise",
    "counter-clockwise": "clockwise",
    "bouncing": "bouncing",
    "none": "none",
}
MIRRORED = {
    "left_to_right": "right_to_left",
    "right_to_left": "left_to_right",
    "top_to_bottom": "top_to_bottom",
    "bottom_to_top": "bottom_to_top",
    "top_left_to_bottom_right": "top_right_to_bottom_left",
    "bottom_right_to_top_left": "bottom_left_to_top_right",
    "top_right_to_bottom_left": "top_left_to_bottom_right",
    "bottom_left_to_top_right": "bottom_right_to_top_left",
    "clockwise": "counter-clockwise",
    "counter-clockwise": "clockwise",
    "bouncing": "bouncing",
    "none": "none",
}
CPU = tp.Runtime(torch.device("cpu"), "float32", nullcontext(), False, 0, 1, False, True)


def test_probe_labels_are_the_toy_vocabulary():
    """The heads' classes, in the order the hand indices of the tests below assume."""
    assert tp.probe_labels() == {
        "kind": KINDS,
        "shuffled": ["real", "shuffled"],
        "type": TYPES,
        "shape": SHAPES,
        "color": COLORS,
        "color_to": COLORS,
        "motion": MOTIONS,
    }


def _attrs(type_, shape, color, color_to, motion):
    return {"type": type_, "shape": shape, "color": color, "color_to": color_to, "motion": motion}


@pytest.mark.parametrize(
    "kind,attrs,want",
    [
        (
            "shapes",
            _attrs("moving", "triangle", "cyan", None, "bottom_left_to_top_right"),
            {"kind": 0, "type": 0, "shape": 2, "color": 6, "color_to": -100, "motion": 7},
        ),
        (
            "shapes",
            _attrs("rotating", "square", "purple", None, "counter-clockwise"),
            {"kind": 0, "type": 1, "shape": 1, "color": 4, "color_to": -100, "motion": 9},
        ),
        (  # no shape; no motion, which the motion head calls "none"
            "shapes",
            _attrs("color_transition", None, "yellow", "green", None),
            {"kind": 0, "type": 2, "shape": -100, "color": 3, "color_to": 1, "motion": 11},
        ),
        (
            "shapes",
            _attrs("bouncing", "circle", "white", None, "bouncing"),
            {"kind": 0, "type": 3, "shape": 0, "color": 7, "color_to": -100, "motion": 10},
        ),
        ("pendulum", None, {"kind": 2}),
        ("smoke", None, {"kind": 6}),
        ("moving_mnist", None, {"kind": 5}),
    ],
)
def test_targets_of_each_kind_and_attribute_by_hand(kind, attrs, want):
    """targets(): the kind's index, 'shuffled' = 0 (in order), each prompted-shape attribute its
    class index, motion 'none' for a colour transition, -100 (ignored) where a head does not
    apply; every head not in `want` is -100."""
    full = {k: -100 for k in tp.probe_labels()}
    full.update(want, shuffled=0)
    assert tp.targets(tp.probe_labels(), kind, attrs) == full


def test_probe_set_labels_kinds_in_order_and_holds_out_disjoint_videos():
    """probe_set: n videos per kind (4n of shapes) in PROBE_KINDS order with their kind index;
    attribute heads only on shapes, matching the data set's own attrs; the val videos never
    repeat a train video."""
    labels = tp.probe_labels()
    x, y = tp.probe_set(labels, 2, "train", 0)
    want_kind = [0] * 8 + [k for k in range(1, 7) for _ in range(2)]
    assert y["kind"].tolist() == want_kind and x.shape == (20, 3, 16, 32, 32)
    assert x.dtype == torch.uint8 and (y["shuffled"] == 0).all()
    ds = td.make_dataset("shapes", 8, resolution=64, num_frames=16, seed=0, split="train")
    for i in range(8):
        a = ds[i]["attrs"]
        assert TYPES[int(y["type"][i])] == a["type"] and COLORS[int(y["color"][i])] == a["color"]
        assert MOTIONS[int(y["motion"][i])] == (a["motion"] or "none")
    for k in ("type", "shape", "color", "color_to", "motion"):
        assert (y[k][8:] == -100).all()
    vx, vy = tp.probe_set(labels, 4, "val", 0)
    assert vy["kind"].tolist() == [0] * 16 + [k for k in range(1, 7) for _ in range(4)]
    same = (vx.flatten(1)[:, None] == x.flatten(1)[None]).all(-1)
    assert not same.any(), "a held-out video is also a training video"


def test_motion_label_maps_by_hand_and_by_geometry():
    """played_backwards / mirrored and label_maps: the hand tables above, and toy_data's own
    direction vectors: backwards negates (dx, dy), a left-right mirror negates dx only."""
    for m in MOTIONS:
        assert tp.played_backwards(m) == BACKWARDS[m] and tp.mirrored(m) == MIRRORED[m]
    for d in td.DIRECTIONS:
        dx, dy = td.direction_vector(d)
        assert td.direction_vector(tp.played_backwards(d)) == (-dx, -dy)
        assert td.direction_vector(tp.mirrored(d)) == (-dx, dy)
    rev, mir = tp.label_maps(tp.probe_labels())
    assert [MOTIONS[int(i)] for i in rev] == [BACKWARDS[m] for m in MOTIONS]
    assert [MOTIONS[int(i)] for i in mir] == [MIRRORED[m] for m in MOTIONS]


def _centroid(clip):
    """(3, T, H, W) -> (T, 2) brightness-weighted (x, y), y down."""
    v = clip.mean(0)
    ys, xs = torch.meshgrid(torch.arange(v.shape[1]), torch.arange(v.shape[2]), indexing="ij")
    m = v.sum((1, 2))
    return torch.stack([(v * xs).sum((1, 2)) / m, (v * ys).sum((1, 2)) / m], 1)


def test_augment_labels_describe_the_augmented_pixels():
    """augment, checked on the pixels: after a random time reversal / left-right mirror, a moving
    shape's centroid moves the way its motion label says (toy_data.direction_vector), a
    rotating square turns the way its label says (metrics.rotation_rate), a colour transition
    starts at its 'color' and ends at its 'color_to'; clips not flagged as prompted shapes and
    labels of other heads are untouched."""
    labels = tp.probe_labels()
    gen = td.ToyVideoGenerator(32, 32, 16, seed=3)
    clips = [
        (gen.generate_moving_shape("square", "white", "top_left_to_bottom_right")[0], "moving"),
        (gen.generate_moving_shape("circle", "yellow", "right_to_left")[0], "moving"),
        (gen.generate_rotating_shape("square", "white", "clockwise")[0], "rotating"),
        (gen.generate_color_transition("red", "blue")[0], "color_transition"),
        (gen.generate_moving_shape("circle", "white", "top_to_bottom")[0], "not shapes"),
    ]
    motion = ["top_left_to_bottom_right", "right_to_left", "clockwise", "none", "top_to_bottom"]
    color = [7, 3, 7, 0, 7]
    color_to = [-100, -100, -100, 2, -100]
    reps = 24
    n = reps * len(clips)
    x0 = torch.stack([c.transpose(0, 1) for c, _ in clips]).repeat(reps, 1, 1, 1, 1)
    what = [w for _, w in clips] * reps
    y0 = {
        "motion": torch.tensor([MOTIONS.index(m) for m in motion] * reps),
        "color": torch.tensor(color * reps),
        "color_to": torch.tensor(color_to * reps),
        "kind": torch.tensor([0, 0, 0, 0, 3] * reps),
    }
    is_shapes = torch.tensor([True, True, True, True, False] * reps)
    x, y = x0.clone(), {k: v.clone() for k, v in y0.items()}
    tp.augment(x, y, tp.label_maps(labels), is_shapes, torch.Generator().manual_seed(0))
    assert torch.equal(y["kind"], y0["kind"])
    changed = 0
    for i in range(n):
        changed += not torch.equal(x[i], x0[i])
        label = MOTIONS[int(y["motion"][i])]
        if what[i] == "not shapes":
            assert torch.equal(x[i], x0[i]) and label == "top_to_bottom"
        if what[i] in ("moving", "not shapes"):
            c = _centroid(x[i])
            d = c[-1] - c[0]  # a still axis moves by anti-aliasing noise only
            step = torch.where(d.abs() > 2, d.sign(), torch.zeros(2)).long().tolist()
            assert tuple(step) == td.direction_vector(label), (i, label, step)
            assert int(y["color"][i]) == color[i % 5] and int(y["color_to"][i]) == -100
        elif what[i] == "rotating":
            rate = float(M.rotation_rate(x[i].transpose(0, 1), 4))
            assert (rate > 0.05) if label == "clockwise" else (rate < -0.05), (i, label, rate)
        else:
            assert label == "none"
            rgb = [torch.tensor(td.COLORS[c]) for c in ("red", "blue")]
            first, last = x[i][:, 0].mean((1, 2)), x[i][:, -1].mean((1, 2))
            got = {int(y["color"][i]): first, int(y["color_to"][i]): last}
            assert set(got) == {0, 2}
            assert torch.allclose(got[0], rgb[0], atol=0.02)
            assert torch.allclose(got[2], rgb[1], atol=0.02)
    assert 50 < changed < 90  # 96 prompted-shape clips, 3/4 of them flipped on average


def test_probe_loss_is_the_masked_cross_entropy_by_hand():
    """probe_loss: the sum over heads of each head's cross-entropy -log softmax(logits)[y],
    averaged over the rows that have a label (-100 rows left out), heads without any label
    skipped."""
    logits = {
        "a": torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [1.0, 2.0, 3.0], [0.0, 1.0, 0.0]]),
        "b": torch.tensor([[0.0, 3.0], [1.0, 0.0], [2.0, 2.0], [0.0, 0.0]]),
        "c": torch.tensor([[5.0, 0.0], [0.0, 5.0], [1.0, 1.0], [0.0, 0.0]]),
    }
    y = {
        "a": torch.tensor([0, 2, -100, 1]),
        "b": torch.tensor([-100, 0, -100, -100]),
        "c": torch.full((4,), -100),
    }

    def ce(row, k):
        return math.log(sum(math.exp(v) for v in row)) - row[k]

    a = (ce([2, 0, -1], 0) + ce([0.5, 0.5, 0.5], 2) + ce([0, 1, 0], 1)) / 3
    b = ce([1, 0], 0)
    assert float(tp.probe_loss(logits, y)) == pytest.approx(a + b, rel=1e-6)


class _ReadOffProbe(torch.nn.Module):
    """A stand-in probe whose answers are read off its input: class k of 'kind' and 'color' where
    channel 0 holds 20 k / 255; 'shuffled' where the frame codes of channel 1 are not
    non-decreasing."""

    def forward(self, x):
        k = (x[:, 0, 0, 0, 0] * 255 / 20).round().long()
        one = torch.nn.functional.one_hot(k, 3).float()
        ordered = (x[:, 1, :, 0, 0].diff(dim=1) >= 0).all(1)
        return {"kind": one, "color": one, "shuffled": torch.stack([ordered, ~ordered], 1).float()}


def test_accuracy_counts_by_hand():
    """accuracy: per head the fraction of labelled (not -100) held-out videos whose argmax is the
    label; 'shuffled' the mean of the in-order rate on the videos and the caught rate on their
    frame-shuffled copies. 70 videos: more than one batch of 64."""
    n = 70
    x = torch.zeros(n, 3, 16, 2, 2, dtype=torch.uint8)
    pred = torch.arange(n) % 3
    x[:, 0] = (20 * pred).view(n, 1, 1, 1).to(torch.uint8)
    t = torch.arange(16)
    x[:40, 1] = (10 * t + 5).view(16, 1, 1).to(torch.uint8)  # in order: real, then caught
    x[40:60, 1] = 80  # static: real, and its shuffled copy is missed
    x[60:, 1] = (160 - 10 * t).view(16, 1, 1).to(torch.uint8)  # backwards: called shuffled
    y = {
        "kind": torch.where(torch.arange(n) < 49, pred, (pred + 1) % 3),
        "color": torch.where(torch.arange(n) < 21, pred, (pred + 1) % 3),
        "shuffled": torch.zeros(n, dtype=torch.long),
    }
    y["color"][::2] = -100  # 35 labelled, the odd ones; 10 of them (1, 3, ..., 19) right
    acc = tp.accuracy(_ReadOffProbe(), x, y, torch.Generator().manual_seed(0), "cpu")
    assert acc["kind"] == pytest.approx(49 / 70)
    assert acc["color"] == pytest.approx(10 / 35)
    assert acc["shuffled"] == pytest.approx((60 / 70 + 50 / 70) / 2)


def test_lr_curve_by_hand():
    """probe_lr: linear warm-up over total // 20 steps (at least 1), (step + 1) / warm of the
    peak, then 0.5 (1 + cos(pi step / total)) of it: half at the middle, 0 at the end and after."""
    peak = 3.0
    # total 40: warm-up 2 steps
    assert tp.probe_lr(0, 40, peak) == pytest.approx(1.5)
    assert tp.probe_lr(1, 40, peak) == pytest.approx(1.5 * (1 + math.cos(math.pi / 40)))
    assert tp.probe_lr(2, 40, peak) == pytest.approx(1.5 * (1 + math.cos(2 * math.pi / 40)))
    assert tp.probe_lr(10, 40, peak) == pytest.approx(1.5 * (1 + math.sqrt(0.5)))
    assert tp.probe_lr(20, 40, peak) == pytest.approx(1.5)
    assert tp.probe_lr(30, 40, peak) == pytest.approx(1.5 * (1 - math.sqrt(0.5)))
    assert tp.probe_lr(40, 40, peak) == pytest.approx(0.0, abs=1e-12)
    assert tp.probe_lr(45, 40, peak) == pytest.approx(0.0, abs=1e-12)
    # total 400: warm-up 20 steps, linear in between
    for step in (0, 4, 9, 18):
        assert tp.probe_lr(step, 400, peak) == pytest.approx(peak * (step + 1) / 20)
    # fewer than 20 steps: warm-up of one step, so the first step runs at the peak
    assert tp.probe_lr(0, 10, peak) == pytest.approx(peak)
    assert tp.probe_lr(5, 10, peak) == pytest.approx(peak / 2)


def _fake_data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = tp.probe_labels()
    y = {k: torch.full((n,), -100) for k in labels}
    y["kind"] = torch.arange(n) % 7
    y["shuffled"] = torch.zeros(n, dtype=torch.long)
    return {
        "x": torch.randint(0, 256, (n, 3, 16, 32, 32), generator=g, dtype=torch.uint8),
        "y": y,
        "weight": torch.ones(n),
        "is_shapes": torch.zeros(n, dtype=torch.bool),
        "maps": tp.label_maps(labels),
    }


def test_train_runs_at_the_hand_lr_curve(monkeypatch):
    """train(): step s runs at probe_lr's curve written out by hand (warm-up 1 step for 8
    steps, then cosine), read off the optimiser at each step."""
    seen = []
    step = tp.train_step

    def spy(model, opt, scaler, x, y, amp):
        seen.append(opt.param_groups[0]["lr"])
        return step(model, opt, scaler, x, y, amp)

    monkeypatch.setattr(tp, "train_step", spy)
    torch.manual_seed(0)
    probe = M.VideoProbe(tp.probe_labels(), widths=(4, 4, 4, 4))
    args = tp.Args(steps=8, batch_size=2, lr=0.4, log_every=100)
    tp.train(probe, _fake_data(), args, CPU, torch.Generator().manual_seed(0))
    want = [0.4] + [0.2 * (1 + math.cos(math.pi * s / 8)) for s in range(1, 8)]
    assert seen == pytest.approx(want)


def test_train_set_oversamples_shapes_and_rotations(monkeypatch):
    """train_set: sampling weight 3 for a prompted shape, 3 for a rotation, multiplied (9 for a
    rotating shape), 1 otherwise; is_shapes flags the kind 'shapes'."""
    labels = tp.probe_labels()
    kinds = ["shapes", "shapes", "shapes", "shapes", "pendulum", "smoke"]
    attrs = [
        _attrs("rotating", "square", "red", None, "clockwise"),
        _attrs("moving", "circle", "red", None, "left_to_right"),
        _attrs("color_transition", None, "red", "blue", None),
        _attrs("bouncing", "circle", "red", None, "bouncing"),
        None,
        None,
    ]
    ys = [tp.targets(labels, k, a) for k, a in zip(kinds, attrs)]
    y = {k: torch.tensor([t[k] for t in ys]) for k in labels}
    monkeypatch.setattr(tp, "probe_set", lambda *a: (torch.zeros(6, 3, 16, 32, 32), y))
    data = tp.train_set(labels, 1, 0)
    assert data["weight"].tolist() == [9.0, 3.0, 3.0, 3.0, 1.0, 1.0]
    assert data["is_shapes"].tolist() == [True] * 4 + [False] * 2


def test_draw_batch_draws_by_weight_scales_and_keeps_labels():
    """draw_batch: videos drawn with probability weight / sum (9:3:1), scaled to [0, 1] by 1/255,
    each with its own labels; about a quarter frame-shuffled (labelled so)."""
    labels = tp.probe_labels()
    x = torch.zeros(3, 3, 16, 2, 2, dtype=torch.uint8)
    for i in range(3):
        x[i] = 40 * (i + 1)  # static: a shuffle leaves the pixels, so a clip is its value
    y = {k: torch.full((3,), -100) for k in labels}
    y["kind"] = torch.tensor([4, 5, 6])
    y["shuffled"] = torch.zeros(3, dtype=torch.long)
    data = {
        "x": x,
        "y": y,
        "weight": torch.tensor([9.0, 3.0, 1.0]),
        "is_shapes": torch.zeros(3, dtype=torch.bool),
        "maps": tp.label_maps(labels),
    }
    xb, yb = tp.draw_batch(data, 2600, torch.Generator().manual_seed(0))
    which = (xb[:, 0, 0, 0, 0] * 255 / 40).round().long() - 1
    assert torch.allclose(xb, x[which].float() / 255)
    assert torch.equal(yb["kind"], torch.tensor([4, 5, 6])[which])
    freq = torch.bincount(which, minlength=3).float() / 2600
    assert torch.allclose(freq, torch.tensor([9 / 13, 3 / 13, 1 / 13]), atol=0.03), freq
    assert 0.2 < float((yb["shuffled"] == 1).float().mean()) < 0.3


def test_main_trains_on_train_and_scores_on_test_split(tmp_path, monkeypatch):
    """main and --eval-only: the probe trains on the 'train' split (n per kind) and its held-out
    accuracy comes from the 'test' split (max(4, n // 4) per kind), whose videos are not
    training videos (the probe selects nothing, so no val split is used)."""
    calls = []
    probe_set = tp.probe_set

    def spy(labels, n, split, seed):
        out = probe_set(labels, n, split, seed)
        calls.append((n, split, out[0]))
        return out

    monkeypatch.setattr(tp, "probe_set", spy)
    run(tmp_path / "probe.pt")
    assert [(n, s) for n, s, _ in calls] == [(2, "train"), (4, "test")]
    train_x, test_x = calls[0][2], calls[1][2]
    assert not (test_x.flatten(1)[:, None] == train_x.flatten(1)[None]).all(-1).any()
    calls.clear()
    run(tmp_path / "probe.pt", "--eval-only")
    assert [(n, s) for n, s, _ in calls] == [(4, "test")]
