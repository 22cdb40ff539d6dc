"""train_world_model.py: CLI, outputs, dynamics shapes, rollout on own predictions, losses,
determinism, resume, eval-only, DDP, bad input."""

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tyro
from conftest import assert_flop_rate, torchrun

import train_world_model as wm

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: more threads only contend on a busy CPU

TINY = (
    "--steps 4 --log-every 1 --eval-every 2 --sample-every 2 --ckpt-every 2 "
    "--resolution 32 --frames 6 --context 3 --horizon 2 --train-clips 4 --eval-clips 3 "
    "--test-clips 3 "
    "--width 4 --hidden 8 --heads 2 --batch-size 2 --dtype float32 --no-compile "
    "--device cpu --warmup-steps 1 --lr 3e-3 --curriculum 0.5"
).split()


def run(out_dir, *extra):
    wm.main(tyro.cli(wm.Args, args=[*TINY, "--out-dir", str(out_dir), *extra]))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def tiny_model(dynamics, **kw):
    torch.manual_seed(0)
    model = wm.WorldModel(3, 4, 4, dynamics, hidden=8, layers=2, heads=2, grid=4, window=3, **kw)
    # the output layers start at zero (nothing moves); make the dynamics do something
    with torch.no_grad():
        for p in model.dynamics.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("tiny")
    run(out)
    return out


# ----------------------------------------------------------------------------- CLI and outputs
def test_help_shows_field_docs():
    r = subprocess.run(
        [sys.executable, "train_world_model.py", "--help"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    for text in (
        "--dynamics",
        "--decoder-attn, --no-decoder-attn",
        "--compile, --no-compile",
        "--resume, --no-resume",
        "--eval-only",
        "--rollout",
        "true frame differences",
        "bfloat16",
    ):
        assert text in r.stdout, text


def test_tiny_run_writes_outputs(tiny):
    ck = load(tiny / "ckpt.pt")
    assert ck["script"] == "train_world_model.py" and ck["step"] == 4
    assert ck["arch"]["dynamics"] == "gru"
    assert {"model", "optimizer", "scaler", "rng", "arch", "best_val"} <= ck.keys()
    assert "_orig_mod" not in "".join(ck["model"])
    assert len(ck["rng"]["data"]) == 1
    best = load(tiny / "ckpt_best.pt")
    assert best["val_loss"] == ck["best_val"] and best["step"] in (2, 4) and "optimizer" not in best
    assert list(tiny.glob("events.out.tfevents.*"))
    m = json.loads((tiny / "metrics.json").read_text())
    assert m["script"] == "train_world_model.py" and m["step"] == 4
    ours, base = m["eval"], m["baselines"]["copy_last"]
    assert ours.keys() == base.keys()
    assert {"psnr", "ssim", "mse", "mse_frame_sum", "psnr_rollout"} <= ours.keys()
    for key in ("psnr_per_frame", "ssim_per_frame", "mse_frame_sum_per_frame"):
        # default rollout: 3 x --horizon, past the training horizon
        assert len(ours[key]) == len(base[key]) == 6
    # headline: the 2 trained frames
    assert ours["psnr"] == pytest.approx(sum(ours["psnr_per_frame"][:2]) / 2)
    assert base["mse_frame_sum"] == pytest.approx(32 * 32 * 3 * base["mse"])
    assert m["val"]["best_loss"] == ck["best_val"] and m["losses"]["loss"] > 0
    assert m["val"]["selected_step"] == best["step"]
    assert m["perf"]["train_samples_per_s"] > 0
    assert_flop_rate(m["perf"])
    assert m["perf"]["gen_frames_per_s"] > 0
    data = {"kind": "bouncing_balls", "resolution": 32, "split": "test", "test_file": None}
    assert m["data"] == {**data, "n_eval": 3, "context": 3, "horizon": 2, "rollout": 6}
    for f in (
        "samples/rollout_000002.gif",
        "samples/rollout_000004.gif",
        "samples/rollout_latest.png",
        "plots/horizon.png",
        "plots/horizon_ssim.png",
        "plots/training_curves.png",
    ):
        assert (tiny / f).stat().st_size > 0, f


# ----------------------------------------------------------------------------- model and method
@pytest.mark.parametrize("dynamics", wm.DYNAMICS)
def test_shapes_through_every_dynamics(dynamics):
    model = tiny_model(dynamics, decoder_attn=dynamics == "gru")
    rec, pred, z = model(torch.rand(2, 3, 3, 32, 32), 7)
    assert rec.shape == (2, 3, 3, 32, 32)
    assert pred.shape == (2, 7, 3, 32, 32)
    assert z.shape == (2, 7, 4, 4, 4)
    assert torch.isfinite(pred).all()
    grey = wm.WorldModel(1, 4, 4, dynamics, hidden=8, heads=2, grid=8, window=2)
    assert grey(torch.rand(1, 2, 1, 64, 64), 3)[1].shape == (1, 3, 1, 64, 64)


@pytest.mark.parametrize("dynamics", wm.DYNAMICS)
def test_rollout_feeds_back_its_own_predictions(dynamics):
    model = tiny_model(dynamics)
    frames = torch.rand(2, 6, 3, 32, 32)
    with torch.no_grad():
        z_true = model.encode(frames.flatten(0, 1)).unflatten(0, (2, 6))
        z_pred = model.rollout(z_true[:, :3], 3)
        state = None
        for t in range(3):
            z, state = model.dynamics(z_true[:, t], state)
        assert torch.equal(z, z_pred[:, 0])
        fed_pred, _ = model.dynamics(z_pred[:, 0], state)
        fed_true, _ = model.dynamics(z_true[:, 3], state)
    assert torch.allclose(fed_pred, z_pred[:, 1], atol=1e-6)
    assert not torch.allclose(fed_true, z_pred[:, 1], atol=1e-3)


def test_truth_after_context_does_not_change_prediction():
    args = tyro.cli(wm.Args, args=[*TINY])
    model = tiny_model("transformer")
    clips = (torch.rand(3, 3 + 6, 3, 32, 32) * 255).to(torch.uint8)
    other = clips.clone()
    other[:, 3:] = 255 - other[:, 3:]
    a, base_a, _, _, frames_a = wm.evaluate(model, clips, args, torch.device("cpu"), nullcontext())
    b, base_b, _, _, frames_b = wm.evaluate(model, other, args, torch.device("cpu"), nullcontext())
    # predictions: identical; scores against the changed truth: not
    assert torch.equal(frames_a, frames_b)
    assert a["psnr"] != b["psnr"] and base_a["psnr_per_frame"] != base_b["psnr_per_frame"]


def test_transformer_cache_stays_bounded_past_the_window():
    model = tiny_model("transformer")
    z, caches = torch.randn(1, 4, 4, 4), None
    with torch.no_grad():
        for _ in range(8):
            z, caches = model.dynamics(z, caches)
    assert len(caches) == 2 and all(len(c) == 3 for c in caches) and torch.isfinite(z).all()


def test_temporal_loss_matches_motion_instead_of_penalising_it():
    target = torch.zeros(1, 5, 1, 16, 16)
    for t in range(5):
        target[0, t, 0, 4:8, 2 * t : 2 * t + 4] = 1.0  # a square moving right
    shifted = target + 0.2  # wrong brightness, right motion
    assert wm.temporal_loss(shifted, target) == pytest.approx(0.0, abs=1e-12)
    # the seed's |x_t+1 - x_t| would punish the true motion
    assert target.diff(dim=1).abs().mean() > 0
    still = target[:, :1].expand_as(target)
    assert wm.temporal_loss(still, target) > 0.01
    total, terms = wm.world_model_losses(target[:, :2], target[:, 2:], target[:, :2], target[:, 2:])
    assert total == 0 and torch.equal(terms, torch.zeros(5))


def test_gradient_difference_loss_pays_for_blur():
    sharp = torch.zeros(1, 1, 1, 16, 16)
    sharp[..., 4:12, 4:12] = 1.0
    blurred = torch.nn.functional.avg_pool2d(sharp[0], 5, 1, 2)[None]
    assert wm.gradient_difference_loss(sharp, sharp) == 0
    assert wm.gradient_difference_loss(blurred, sharp) > 0.01


def test_curriculum_grows_rollout_to_horizon():
    args = wm.Args(steps=100, horizon=10, curriculum=0.3)
    lens = [wm.rollout_len(s, args) for s in range(100)]
    assert lens[0] == 1 and lens[29] == 10 and max(lens) == 10 and lens == sorted(lens)
    assert wm.rollout_len(0, wm.Args(curriculum=0.0)) == 10


def test_batches_are_windows_of_pool_clips():
    args = wm.Args(context=2, horizon=3, batch_size=6)
    pool = torch.arange(4 * 9).view(4, 9, 1, 1, 1).to(torch.uint8)  # clip i, frame t -> 9 i + t
    x, none = wm.sample_batch(pool, torch.Generator().manual_seed(0), args, torch.device("cpu"))
    assert none is None  # no actions without --actions
    assert x.shape == (6, 5, 1, 1, 1)
    values = (x.flatten(1) * 255).round()
    first = values[:, 0]
    assert (first % 9 + 5 <= 9).all()  # the whole window lies inside one clip
    assert torch.equal(values, first[:, None] + torch.arange(5.0))  # consecutive frames


def test_rollout_losses_score_only_the_first_k_predicted_frames():
    args = wm.Args(context=3)
    model = tiny_model("gru")
    x = torch.rand(2, 3 + 4, 3, 32, 32)
    with torch.no_grad():
        rec, pred, _ = model(x[:, :3], 4)
        total, terms, rec2, pred2 = wm.rollout_losses(model, x, 2, args, nullcontext(), steps=4)
    assert torch.equal(rec, rec2) and torch.equal(pred, pred2)
    mse_rec = ((rec - x[:, :3]) ** 2).mean()
    mse_pred = ((pred[:, :2] - x[:, 3:5]) ** 2).mean()
    assert float(terms[1]) == pytest.approx(float(mse_rec), rel=1e-5)
    assert float(terms[2]) == pytest.approx(float(mse_pred), rel=1e-5)
    assert float(total) == pytest.approx(float(terms[0]))


# ----------------------------------------------------------------------------- determinism, resume
def test_same_seed_same_run(tiny, tmp_path):
    run(tmp_path, "--sample-every", "100")
    a, b = load(tiny / "ckpt.pt"), load(tmp_path / "ckpt.pt")
    assert same_state(a["model"], b["model"]) and a["best_val"] == b["best_val"]
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (tiny, tmp_path))
    assert ma["eval"]["psnr"] == mb["eval"]["psnr"] and ma["losses"] == mb["losses"]


def test_ctrl_c_saves_and_resume_equals_straight_run(tiny, tmp_path, monkeypatch):
    lr_at = wm.lr_at

    def ctrl_c_in_step_3(step, *rest):  # Ctrl-C arrives in the middle of the third step
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return lr_at(step, *rest)

    monkeypatch.setattr(wm, "lr_at", ctrl_c_in_step_3)
    with pytest.raises(SystemExit, match="interrupted after step 3"):
        run(tmp_path)
    assert load(tmp_path / "ckpt.pt")["step"] == 3
    monkeypatch.setattr(wm, "lr_at", lr_at)
    run(tmp_path)
    a, b = load(tiny / "ckpt.pt"), load(tmp_path / "ckpt.pt")
    assert b["step"] == 4 and a["best_val"] == b["best_val"]
    assert same_state(a["model"], b["model"])
    assert torch.equal(a["rng"]["data"][0], b["rng"]["data"][0])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)


def test_eval_only_reproduces_eval(tiny, tmp_path):
    """The run's figures are those of ckpt_best.pt on the test clips: --eval-only of it gives
    them again."""
    before = digest(tiny / "ckpt.pt")
    run(tmp_path, "--eval-only", "--ckpt", str(tiny / "ckpt_best.pt"))
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tiny, tmp_path))
    pairs = {
        "eval": (a["eval"], b["eval"]),
        "baselines": (a["baselines"]["copy_last"], b["baselines"]["copy_last"]),
    }
    for part, (x, y) in pairs.items():
        for k in ("psnr", "ssim", "mse_frame_sum", "psnr_rollout"):
            assert y[k] == pytest.approx(x[k], rel=1e-6), (part, k)
        assert y["psnr_per_frame"] == pytest.approx(x["psnr_per_frame"], rel=1e-6)
    best_step = load(tiny / "ckpt_best.pt")["step"]
    assert b["perf"]["train_samples_per_s"] is None and b["step"] == best_step
    assert digest(tiny / "ckpt.pt") == before and not (tmp_path / "ckpt.pt").exists()
    assert (tmp_path / "plots" / "horizon.png").exists()
    assert (tmp_path / "samples" / f"rollout_{best_step:06d}.gif").exists()
    run(tmp_path / "best", "--eval-only", "--ckpt", str(tiny / "ckpt_best.pt"), "--rollout", "9")
    m = json.loads((tmp_path / "best" / "metrics.json").read_text())
    assert len(m["eval"]["psnr_per_frame"]) == 9
    assert m["step"] == load(tiny / "ckpt_best.pt")["step"]


def test_transformer_and_lstm_train(tmp_path):
    for dyn in ("transformer", "lstm"):
        run(tmp_path / dyn, "--dynamics", dyn, *"--steps 2 --eval-every 9 --sample-every 9".split())
        m = json.loads((tmp_path / dyn / "metrics.json").read_text())
        assert load(tmp_path / dyn / "ckpt.pt")["arch"]["dynamics"] == dyn
        assert m["losses"]["loss"] > 0


def test_torchrun_two_cpu_processes(tmp_path):
    args = ["train_world_model.py", *TINY, "--out-dir", str(tmp_path / "run")]
    r = torchrun([*args, "--eval-every", "100", "--sample-every", "100"], ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load(tmp_path / "run" / "ckpt.pt")
    assert ck["step"] == 4 and len(ck["rng"]["data"]) == 2
    # ranks draw different windows
    assert not torch.equal(ck["rng"]["data"][0], ck["rng"]["data"][1])
    assert "world 2" in r.stdout and "2 training clips/rank" in r.stdout
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["step"] == 4


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dynamics", "mamba"], "error: unknown --dynamics 'mamba'"),
        (["--data", "nonsense"], "error: unknown data kind"),
        (["--data", "folder"], "error: .*data_dir"),
        # a --data-dir is never ignored: it implies its kind, or stops
        (["--data-dir", "/nonexistent"], "error: --data-dir /nonexistent does not exist"),
        (["--data", "pendulum", "--data-dir", "/"], "error: --data pendulum is generated"),
        (
            ["--data", "folder", "--data-dir", "/nonexistent/videos"],
            "error: video folder /nonexistent/videos does not exist",
        ),
        (["--resolution", "36"], "error: --resolution 36"),
        (["--frames", "4"], "error: need .*--frames >= --context \\+ --horizon"),
        (["--latent-grid", "12"], "error: --latent-grid 12 must be --resolution 32 divided by"),
        (["--fresh", "--data", "folder", "--data-dir", "."], "error: --fresh draws new generated"),
        (["--ckpt", "/nonexistent/ckpt.pt"], "error: --ckpt /nonexistent/ckpt.pt does not exist"),
    ],
)
def test_bad_input_one_line(tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message) as e:
        run(tmp_path, *extra)
    assert "\n" not in str(e.value.code)
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "args.json").exists()


def test_checkpoint_of_another_script(tmp_path):
    torch.save({"script": "train_vqvae.py", "step": 3, "model": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit, match="error: .*written by train_vqvae.py"):
        run(tmp_path)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="error: cannot read checkpoint"):
        run(tmp_path, "--eval-only", "--ckpt", str(tmp_path / "bad.pt"))


def test_failing_runs_keep_good_checkpoint(tiny, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(tiny, d)
    good, good_best = digest(d / "ckpt.pt"), digest(d / "ckpt_best.pt")
    arch_error = "error: .*another architecture: dynamics=gru \\(now lstm\\)"
    with pytest.raises(SystemExit, match=arch_error):
        run(d, "--dynamics", "lstm")
    with pytest.raises(SystemExit, match="error: .*holds best weights only"):
        run(d, "--ckpt", str(d / "ckpt_best.pt"))
    diverge = "--steps 12 --lr 1e30 --ckpt-every 100 --eval-every 100 --sample-every 100"
    with pytest.raises(SystemExit, match="trained with --steps 4 --lr 0.003, not --steps 12"):
        run(d, *diverge.split())  # would reshape the schedule: refused
    with pytest.raises(SystemExit, match="error: non-finite loss"):
        run(d, "--accept-changed-args", *diverge.split())
    assert digest(d / "ckpt.pt") == good and digest(d / "ckpt_best.pt") == good_best


# ----------------------------------------------------------------------------- method invariants
# Each test below checks the script against a computation written out here: numbers by hand, a
# closed form, or a plain re-implementation that reads only the modules' parameters.
def conv(x, layer):
    """The 3x3 'same' convolution of a Conv2d layer, written with its weights."""
    return F.conv2d(x, layer.weight, layer.bias, padding=layer.padding)


def ref_gru_step(m, z, h):
    """ConvGRU, Ballas et al.: r resets the state inside the candidate, u keeps the old state."""
    x = F.silu(conv(z, m.inp))
    h = torch.zeros_like(x) if h is None else h
    n = x.shape[1]
    gates = torch.sigmoid(conv(torch.cat([x, h], 1), m.gates))
    r, u = gates[:, :n], gates[:, n:]
    cand = torch.tanh(conv(torch.cat([x, r * h], 1), m.cand))
    h = u * h + (1 - u) * cand
    return z + conv(h, m.out), h


def ref_lstm_step(m, z, state):
    """ConvLSTM, Shi et al. (no peepholes); the gates' conv outputs are ordered i, f, o, g."""
    x = F.silu(conv(z, m.inp))
    h, c = (torch.zeros_like(x), torch.zeros_like(x)) if state is None else state
    n = x.shape[1]
    a = conv(torch.cat([x, h], 1), m.gates)
    i, f, o, g = (a[:, j * n : (j + 1) * n] for j in range(4))
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return z + conv(h, m.out), (h, c)


def ref_space_bias(block, grid):
    """(heads, N, N): the learned bias of the offset (dy, dx) = query cell - key cell."""
    n = grid * grid
    bias = torch.empty(block.heads, n, n)
    for q in range(n):
        for k in range(n):
            dy, dx = q // grid - k // grid, q % grid - k % grid
            bias[:, q, k] = block.space[:, (dy + grid - 1) * (2 * grid - 1) + dx + grid - 1]
    return bias


def ref_transformer_step(m, z, frames, slopes, grid):
    """One step of the causal transformer, written out. frames: per layer, the (k, v) of the
    frames seen so far, oldest first (the caller's own list). Keys of the last m.window frames
    only; the current frame's cells attend to each other and to those; ALiBi -slope * age."""
    B, C, H, W = z.shape
    x = conv(z, m.inp).flatten(2).transpose(1, 2) + m.pos
    for blk, seen in zip(m.blocks, frames):
        D, nh = x.shape[-1], blk.heads
        dh = D // nh
        qkv = F.linear(F.layer_norm(x, (D,), blk.n1.weight, blk.n1.bias), blk.qkv.weight)
        qkv = qkv + blk.qkv.bias
        q, k, v = (
            qkv[..., j * D : (j + 1) * D].view(B, -1, nh, dh).transpose(1, 2) for j in (0, 1, 2)
        )
        seen.append((k, v))
        window = seen[-m.window :]
        space = ref_space_bias(blk, grid)
        scores = []
        for f, (kf, _) in enumerate(window):
            age = len(window) - 1 - f
            s = q @ kf.transpose(-1, -2) / math.sqrt(dh) - slopes.view(-1, 1, 1) * age + space
            scores.append(s)
        w = torch.softmax(torch.cat(scores, -1), -1)
        out = w @ torch.cat([vf for _, vf in window], 2)
        x = x + F.linear(out.transpose(1, 2).reshape(B, -1, D), blk.proj.weight, blk.proj.bias)
        y = F.layer_norm(x, (D,), blk.n2.weight, blk.n2.bias)
        l1, l2 = blk.mlp[0], blk.mlp[2]
        x = x + F.linear(F.gelu(F.linear(y, l1.weight, l1.bias)), l2.weight, l2.bias)
    x = F.layer_norm(x, (x.shape[-1],), m.norm.weight, m.norm.bias)
    return z + conv(x.transpose(1, 2).reshape(B, -1, H, W), m.out)


def ref_rollout(model, z_context, steps):
    """Read the context latents one by one (state carried), then feed each prediction back."""
    state = None
    for t in range(z_context.shape[1]):
        z, state = model.dynamics(z_context[:, t], state)
    preds = [z]
    while len(preds) < steps:
        z, state = model.dynamics(preds[-1], state)
        preds.append(z)
    return torch.stack(preds, 1)


def ref_losses(context, target, rec, pred, kind, gdl_weight, temporal_weight):
    """[total, rec, pred, gdl, temporal] written out: pixel loss of the reconstructed context and
    the predicted frames; GDL (alpha 1) over the whole sequence; MSE of frame differences with the
    last (reconstructed | true) context frame anchoring the first predicted difference."""

    def pix(a, b):
        d = a - b
        return {"mse": (d**2).mean(), "l1": d.abs().mean(), "mse+l1": (d**2 + d.abs()).mean()}[kind]

    p, t = torch.cat([rec, pred], 1), torch.cat([context, target], 1)
    gx = ((p[..., 1:] - p[..., :-1]).abs() - (t[..., 1:] - t[..., :-1]).abs()).abs().mean()
    gy = ((p[..., 1:, :] - p[..., :-1, :]).abs() - (t[..., 1:, :] - t[..., :-1, :]).abs()).abs()
    l_gdl = gx + gy.mean()
    c = context.shape[1]
    dp, dt = p[:, c:] - p[:, c - 1 : -1], t[:, c:] - t[:, c - 1 : -1]
    l_tmp = ((dp - dt) ** 2).mean()
    l_rec, l_pred = pix(rec, context), pix(pred, target)
    total = l_rec + l_pred + gdl_weight * l_gdl + temporal_weight * l_tmp
    return torch.stack([total, l_rec, l_pred, l_gdl, l_tmp])


def test_gradient_difference_loss_hand_computed():
    """GDL = mean |(|dx pred| - |dx true|)| + the same along y (Mathieu et al., alpha 1), on a
    2x3 frame worked out by hand: x part (1+2+2+0)/4, y part (1+0+0)/3."""
    pred = torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, 0.0]]).view(1, 1, 1, 2, 3)
    true = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 4.0]]).view(1, 1, 1, 2, 3)
    assert float(wm.gradient_difference_loss(pred, true)) == pytest.approx(5 / 4 + 1 / 3, rel=1e-6)
    # transposed frames: the two parts swap axes (x part 1/3, y part 5/4), the sum stays
    flipped = wm.gradient_difference_loss(pred.transpose(-1, -2), true.transpose(-1, -2))
    assert float(flipped) == pytest.approx(5 / 4 + 1 / 3, rel=1e-6)


def test_temporal_loss_hand_computed():
    """temporal = mean((dpred_t - dtrue_t)^2) over frame differences along T: a 3-frame, 2-pixel
    case by hand. dpred = [1, 2], [0, 3]; dtrue = [2, 2], [0, 0] -> (1 + 0 + 0 + 9) / 4."""
    pred = torch.tensor([[0.0, 0.0], [1.0, 2.0], [1.0, 5.0]]).view(1, 3, 1, 1, 2)
    true = torch.tensor([[0.0, 0.0], [2.0, 2.0], [2.0, 2.0]]).view(1, 3, 1, 1, 2)
    assert float(wm.temporal_loss(pred, true)) == pytest.approx(10 / 4, rel=1e-6)
    assert float(wm.temporal_loss(true + 7.0, true)) == 0  # same motion, other brightness


@pytest.mark.parametrize("kind", ["mse", "l1", "mse+l1"])
def test_world_model_losses_terms_and_weights(kind):
    """Every term against ref_losses, and the weights on the right terms: --gdl-weight on the
    gradient difference, --temporal-weight on the temporal term (distinct weights 0.3 and 0.7)."""
    g = torch.Generator().manual_seed(1)
    ctx, tgt, rec, pred = (torch.rand(2, n, 2, 5, 6, generator=g) for n in (3, 2, 3, 2))
    total, terms = wm.world_model_losses(ctx, tgt, rec, pred, kind, 0.3, 0.7)
    ref = ref_losses(ctx, tgt, rec, pred, kind, 0.3, 0.7)
    assert torch.allclose(terms, ref, rtol=1e-5, atol=1e-7), (terms, ref)
    assert float(total) == pytest.approx(float(ref[0]), rel=1e-5)
    # each weight scales its own term only
    t_g, _ = wm.world_model_losses(ctx, tgt, rec, pred, kind, 1.3, 0.7)
    t_t, _ = wm.world_model_losses(ctx, tgt, rec, pred, kind, 0.3, 1.7)
    assert float(t_g - total) == pytest.approx(float(ref[3]), rel=1e-4)
    assert float(t_t - total) == pytest.approx(float(ref[4]), rel=1e-4)


def test_rollout_losses_score_context_and_first_k_targets_exactly():
    """rollout_losses = ref_losses on (x[:, :c] vs the reconstruction, x[:, c:c+k] vs the first k
    of `steps` predicted frames) with the args' loss kind and weights; frames after c + k never
    count, the last of the k does."""
    args = wm.Args(context=3, recon_loss="l1", gdl_weight=0.3, temporal_weight=0.7)
    model = tiny_model("gru")
    x = torch.rand(2, 3 + 4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        rec, pred, _ = model(x[:, :3], 4)
        total, terms, _, _ = wm.rollout_losses(model, x, 2, args, nullcontext(), steps=4)
        later = x.clone()
        later[:, 5:] = 1 - later[:, 5:]
        _, terms_later, _, _ = wm.rollout_losses(model, later, 2, args, nullcontext(), steps=4)
        last = x.clone()
        last[:, 4] = 1 - last[:, 4]
        _, terms_last, _, _ = wm.rollout_losses(model, last, 2, args, nullcontext(), steps=4)
    ref = ref_losses(x[:, :3], x[:, 3:5], rec, pred[:, :2], "l1", 0.3, 0.7)
    assert torch.allclose(terms, ref, rtol=1e-5), (terms, ref)
    assert float(total) == pytest.approx(float(ref[0]), rel=1e-5)
    assert torch.equal(terms_later, terms)
    assert terms_last[2] != terms[2]


def test_gru_cell_hand_computed_gate_combination():
    """ConvGRU on a 1x1 grid with hand-set weights: x = silu(z), r = sigmoid(0) = 1/2 (first
    half of the gates), u = sigmoid(ln 3) = 3/4 (second half), candidate tanh(x + 2 r h), and
    h' = u h + (1 - u) candidate; the next latent is z + h'."""
    m = wm.ConvGRU(1, 1)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.inp.weight[0, 0, 1, 1] = 1.0
        m.gates.bias[1] = math.log(3.0)
        m.cand.weight[0, 0, 1, 1] = 1.0  # x
        m.cand.weight[0, 1, 1, 1] = 2.0  # r * h
        m.out.weight[0, 0, 1, 1] = 1.0
        z_next, h_next = m(torch.full((1, 1, 1, 1), 0.3), torch.full((1, 1, 1, 1), 0.5))
    x = 0.3 / (1 + math.exp(-0.3))
    cand = math.tanh(x + 2 * 0.5 * 0.5)
    h = 0.75 * 0.5 + 0.25 * cand
    assert float(h_next) == pytest.approx(h, rel=1e-6)
    assert float(z_next) == pytest.approx(0.3 + h, rel=1e-6)


def test_lstm_cell_equals_torch_lstm_cell_on_one_cell():
    """ConvLSTM on a 1x1 grid (only the 3x3 kernels' centres see anything) is nn.LSTMCell with
    the centre weights, gates reordered from (i, f, o, g) to torch's (i, f, g, o); the state
    (h, c) is carried over 3 steps."""
    torch.manual_seed(3)
    m = wm.ConvLSTM(2, 3)
    cell = torch.nn.LSTMCell(3, 3)
    order = [0, 1, 3, 2]  # torch's i, f, g, o taken from our chunks i, f, o, g
    w = m.gates.weight[:, :, 1, 1].view(4, 3, 6)[order].reshape(12, 6)
    with torch.no_grad():
        cell.weight_ih.copy_(w[:, :3])
        cell.weight_hh.copy_(w[:, 3:])
        cell.bias_ih.copy_(m.gates.bias.view(4, 3)[order].reshape(12))
        cell.bias_hh.zero_()
        m.out.weight.normal_(0, 0.5)
        state, ref = None, None
        for t in range(3):
            z = torch.randn(2, 2, 1, 1)
            out, state = m(z, state)
            x = F.silu(F.linear(z[:, :, 0, 0], m.inp.weight[:, :, 1, 1], m.inp.bias))
            ref = cell(x, ref)
            assert torch.allclose(state[0][:, :, 0, 0], ref[0], atol=1e-6), t
            assert torch.allclose(state[1][:, :, 0, 0], ref[1], atol=1e-6), t
            z_ref = z[:, :, 0, 0] + F.linear(ref[0], m.out.weight[:, :, 1, 1], m.out.bias)
            assert torch.allclose(out[:, :, 0, 0], z_ref, atol=1e-6), t


@pytest.mark.parametrize("dynamics", ["gru", "lstm"])
def test_recurrent_cells_match_reference_steps(dynamics):
    """The ConvGRU / ConvLSTM update over 4 steps on a 3x3 grid against ref_gru_step /
    ref_lstm_step: gates, candidate and the recurrent state carried from step to step."""
    model = tiny_model(dynamics)
    ref_step = ref_gru_step if dynamics == "gru" else ref_lstm_step
    g = torch.Generator().manual_seed(4)
    state = ref_state = None
    with torch.no_grad():
        for t in range(4):
            z = torch.randn(2, 4, 3, 3, generator=g)
            out, state = model.dynamics(z, state)
            ref, ref_state = ref_step(model.dynamics, z, ref_state)
            assert torch.allclose(out, ref, atol=1e-5), t


def test_transformer_step_matches_reference_attention():
    """Causal transformer over 6 steps (past its window of 3) against ref_transformer_step: keys
    of the current frame and the last window-1 frames only, ALiBi slopes 2^-4, 2^-8 for 2 heads
    times frames back, the learned bias of (query cell - key cell), residuals and norms."""
    model = tiny_model("transformer")
    m = model.dynamics
    slopes = torch.tensor([2.0**-4, 2.0**-8])
    assert torch.allclose(m.slopes, slopes)
    frames = [[] for _ in m.blocks]
    g = torch.Generator().manual_seed(5)
    caches = None
    with torch.no_grad():
        # steeper ALiBi so a wrong age or sign shows clearly
        m.slopes.mul_(16.0)
        for t in range(6):
            z = torch.randn(2, 4, 4, 4, generator=g)
            out, caches = m(z, caches)
            ref = ref_transformer_step(m, z, frames, 16.0 * slopes, 4)
            assert torch.allclose(out, ref, atol=1e-5), (t, (out - ref).abs().max())


def test_transformer_space_bias_starts_local():
    """The spatial bias starts at -(dy^2 + dx^2) for the offset (dy, dx) between query and key
    cells, the same for every head (a fresh model)."""
    blk = wm.CausalTransformer(4, 8, 1, 2, 3, 3).blocks[0]
    bias = ref_space_bias(blk, 3)
    for q in range(9):
        for k in range(9):
            dy, dx = q // 3 - k // 3, q % 3 - k % 3
            assert torch.equal(bias[:, q, k], torch.full((2,), -float(dy * dy + dx * dx)))


def test_transformer_is_causal_and_windowed():
    """One layer, window 3: a later frame never changes an earlier output; the output at step t
    depends on frames t-2..t and not on frame t-3 (outside the window)."""
    torch.manual_seed(6)
    m = wm.CausalTransformer(4, 8, 1, 2, 4, 3)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(7)
    seq = torch.randn(6, 1, 4, 4, 4, generator=g)

    def outputs(frames):
        caches, outs = None, []
        with torch.no_grad():
            for z in frames:
                out, caches = m(z, caches)
                outs.append(out)
        return outs

    base = outputs(seq)
    changed = seq.clone()
    changed[1] = torch.randn(1, 4, 4, 4, generator=g)
    other = outputs(changed)
    assert torch.equal(base[0], other[0])  # a later frame never changes an earlier output
    assert all(not torch.allclose(base[t], other[t], atol=1e-6) for t in (1, 2, 3))  # in window
    assert all(torch.allclose(base[t], other[t], atol=1e-6) for t in (4, 5))  # out of the window
    late = seq.clone()
    late[4] = torch.randn(1, 4, 4, 4, generator=g)
    assert all(torch.equal(a, b) for a, b in zip(base[:4], outputs(late)[:4]))


@pytest.mark.parametrize("dynamics", wm.DYNAMICS)
def test_forward_rolls_out_on_own_latents_against_reference(dynamics):
    """WorldModel.forward against ref_rollout: context encoded from x*2-1, the state carried over
    the context, every predicted latent fed back (own predictions, not encoded truth), frames
    decoded as (decoder + 1) / 2; the gradient flows back through the fed-back latents."""
    model = tiny_model(dynamics)
    ctx = torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    rec, pred, z_pred = model(ctx, 4)
    z = model.encoder(ctx.flatten(0, 1) * 2 - 1).unflatten(0, (2, 3))
    z_ref = ref_rollout(model, z, 4)
    assert torch.allclose(z_pred, z_ref, atol=1e-5), (
        "latents differ from the own-prediction rollout"
    )
    frames = (model.decoder(torch.cat([z, z_ref], 1).flatten(0, 1)) + 1) / 2
    frames = frames.unflatten(0, (2, 7))
    assert torch.allclose(rec, frames[:, :3], atol=1e-5)
    assert torch.allclose(pred, frames[:, 3:], atol=1e-5)
    p = model.dynamics.out.weight
    (g,) = torch.autograd.grad(z_pred[:, 3].square().sum(), p)
    (g_ref,) = torch.autograd.grad(z_ref[:, 3].square().sum(), p)
    assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-6), "no gradient through fed-back latents"


def test_curriculum_hand_schedule():
    """rollout_len: ceil(horizon (step + 1) / (curriculum steps)), at least 1, at most horizon;
    worked out for horizon 4 over 20 steps with curriculum 0.5 (ramp 10 steps)."""
    args = wm.Args(steps=20, horizon=4, curriculum=0.5)
    lens = [wm.rollout_len(s, args) for s in range(20)]
    assert lens == [1, 1, 2, 2, 2, 3, 3, 4, 4, 4] + [4] * 10
    args = wm.Args(steps=10, horizon=3, curriculum=1.0)
    assert [wm.rollout_len(s, args) for s in range(10)] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 3]


def test_training_loop_uses_curriculum_k_on_full_windows(tmp_path, monkeypatch):
    """The training loop: step s trains at rollout length rollout_len(s) (horizon 3, curriculum
    1.0 over 4 steps: 1, 2, 3, 3) on batches of --context + --horizon frames."""
    calls = []
    rollout_losses = wm.rollout_losses

    def record(model, x, k, args, amp, steps=None, actions=None, reencode=False):
        if torch.is_grad_enabled():  # training (evaluation runs under no_grad)
            calls.append((k, steps, tuple(x.shape)))
        return rollout_losses(model, x, k, args, amp, steps, actions, reencode)

    monkeypatch.setattr(wm, "rollout_losses", record)
    monkeypatch.setattr(wm, "step_flops", lambda *a: None)  # its calls are not training steps
    # plots and samples are most of a tiny run's time and none of the method
    monkeypatch.setattr(wm, "save_samples", lambda *a: None)
    monkeypatch.setattr(wm, "save_plots", lambda *a: None)
    monkeypatch.setattr(wm.viz, "plot_training_curves", lambda *a: None)
    extra = "--horizon 3 --curriculum 1.0 --eval-every 100 --sample-every 100 --ckpt-every 100"
    run(tmp_path, *extra.split(), "--rollout", "3", "--eval-clips", "2")
    assert [c[0] for c in calls] == [1, 2, 3, 3]
    assert all(c[1] is None and c[2] == (2, 6, 3, 32, 32) for c in calls), calls


def test_evaluate_scores_model_and_copy_last_on_the_same_frames():
    """evaluate: copy-last repeats the LAST context frame (hand-computed MSE/PSNR per frame on
    flat frames), the model is scored on its rollout after the context against the frames after
    the context (errors on the raw output, PSNR on it clamped to [0, 1], as the published Moving
    MNIST tables), and the validation loss covers the first --horizon frames only."""
    args = tyro.cli(wm.Args, args=[*TINY])  # context 3, horizon 2
    model = tiny_model("gru")
    t = torch.arange(7.0).view(1, 7, 1, 1, 1)
    n = torch.arange(2.0).view(2, 1, 1, 1, 1)
    clips = (10 + 30 * t + 7 * n).expand(2, 7, 3, 32, 32).to(torch.uint8)
    ours, base, val, _, _ = wm.evaluate(model, clips, args, torch.device("cpu"), nullcontext())
    mse = [(30 * j / 255) ** 2 for j in (1, 2, 3, 4)]  # frame 3 + j - 1 vs frame 2
    assert base["mse_per_frame"] == pytest.approx(mse, rel=1e-5)
    assert base["psnr_per_frame"] == pytest.approx([-10 * math.log10(e) for e in mse], rel=1e-5)
    assert base["mse"] == pytest.approx((mse[0] + mse[1]) / 2, rel=1e-5)
    x = clips.float() / 255
    with torch.no_grad():
        rec, pred, _ = model(x[:, :3], 4)
    err = ((pred - x[:, 3:]) ** 2).mean((2, 3, 4))
    assert ours["mse_per_frame"] == pytest.approx(err.mean(0).tolist(), rel=1e-4)
    clamped = ((pred.clamp(0, 1) - x[:, 3:]) ** 2).mean((2, 3, 4))
    assert not torch.allclose(err, clamped)  # the rollout leaves [0, 1]: the two conventions differ
    psnr = (-10 * torch.log10(clamped)).mean(0)
    assert ours["psnr_per_frame"] == pytest.approx(psnr.tolist(), rel=1e-4)
    assert val["pred"] == pytest.approx(float(((pred[:, :2] - x[:, 3:5]) ** 2).mean()), rel=1e-4)
    assert val["rec"] == pytest.approx(float(((rec - x[:, :3]) ** 2).mean()), rel=1e-4)


def test_batches_cover_every_clip_and_start():
    """sample_batch draws the window start uniformly from 0..T-span (the last window included)
    and the clip from the whole pool; each window is context + horizon consecutive frames."""
    args = wm.Args(context=2, horizon=3, batch_size=400)
    pool = torch.arange(4 * 9).view(4, 9, 1, 1, 1).to(torch.uint8)
    x, _ = wm.sample_batch(pool, torch.Generator().manual_seed(9), args, torch.device("cpu"))
    values = (x.flatten(1) * 255).round().long()
    clip, start = values[:, 0] // 9, values[:, 0] % 9
    assert set(clip.tolist()) == {0, 1, 2, 3} and set(start.tolist()) == {0, 1, 2, 3, 4}
    assert torch.equal(values, values[:, :1] + torch.arange(5))


# ----------------------------------------------------------------------------- splits and benchmark
def _rollout_mse_frame_sum(model, clips, context, horizon):
    """The per-frame squared error summed over pixels, mean over clips and the first `horizon`
    predicted frames, of a rollout written out here."""
    x = clips.float() / 255
    with torch.no_grad():
        _, pred, _ = model(x[:, :context], clips.shape[1] - context)
    return float(
        ((pred[:, :horizon] - x[:, context : context + horizon]) ** 2).sum((2, 3, 4)).mean()
    )


def test_figures_come_from_the_best_weights_on_test_clips(tiny):
    """Model selection on val, figures on test: metrics.json's MSE is that of ckpt_best.pt's
    weights on split 'test' clips (not on the val clips it was selected with)."""
    best = load(tiny / "ckpt_best.pt")
    model = wm.WorldModel(**best["arch"])
    model.load_state_dict(best["model"])
    model.eval()
    m = json.loads((tiny / "metrics.json").read_text())
    got = {}
    for split in ("test", "val"):
        ds = wm.toy_data.make_dataset("bouncing_balls", 3, 32, 9, seed=0, split=split)
        clips = torch.stack([(ds[i]["video"] * 255).round() for i in range(3)]).to(torch.uint8)
        got[split] = _rollout_mse_frame_sum(model, clips, 3, 2)
    assert m["eval"]["mse_frame_sum"] == pytest.approx(got["test"], rel=1e-4)
    assert got["val"] != pytest.approx(got["test"], rel=1e-3)


def test_figures_come_from_ckpt_best_not_the_last_weights(tiny, tmp_path):
    """ckpt_best.pt replaced by other weights (as when an earlier step was best on val): running
    the finished run's command again reports the figures of those weights, not of ckpt.pt's."""
    shutil.copytree(tiny, tmp_path / "run")
    best = load(tmp_path / "run" / "ckpt_best.pt")
    other = {
        k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
        for k, v in best["model"].items()
    }
    torch.save({**best, "model": other}, tmp_path / "run" / "ckpt_best.pt")
    run(tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    model = wm.WorldModel(**best["arch"])
    ds = wm.toy_data.make_dataset("bouncing_balls", 3, 32, 9, seed=0, split="test")
    clips = torch.stack([(ds[i]["video"] * 255).round() for i in range(3)]).to(torch.uint8)
    got = {}
    for name, state in (("best", other), ("last", load(tmp_path / "run" / "ckpt.pt")["model"])):
        model.load_state_dict(state)
        got[name] = _rollout_mse_frame_sum(model.eval(), clips, 3, 2)
    assert m["eval"]["mse_frame_sum"] == pytest.approx(got["best"], rel=1e-4)
    assert got["last"] != pytest.approx(got["best"], rel=1e-3)


@pytest.mark.parametrize("down, grid", [(1, 32), (2, 16), (3, 8)])
def test_latent_grid_is_resolution_over_two_to_the_down(down, grid):
    for dynamics in ("gru", "transformer"):
        model = wm.WorldModel(1, 4, 4, dynamics, hidden=8, heads=2, grid=grid, down=down)
        x = torch.rand(2, 3, 1, 64, 64)
        with torch.no_grad():
            z = model.encode(x[:, 0])
            rec, pred, z_pred = model(x, 2)
        assert z.shape == (2, 4, grid, grid) and z_pred.shape == (2, 2, 4, grid, grid)
        assert rec.shape == (2, 3, 1, 64, 64) and pred.shape == (2, 2, 1, 64, 64)
    args = tyro.cli(wm.Args, args=["--latent-grid", "16"])
    assert wm.model_arch(args, 1)["grid"] == 16 and wm.model_arch(args, 1)["down"] == 2
    default = wm.model_arch(wm.Args(), 3)
    assert default["grid"] == 8 and default["down"] == 3  # unchanged: resolution / 8


class _Numbered(torch.utils.data.Dataset):
    """Clip i is the constant (i + 0.3)/255 (6 frames), and every index asked for is recorded."""

    def __init__(self):
        self.asked = []

    def __getitem__(self, i):
        self.asked.append(i)
        return {"video": torch.full((6, 1, 2, 2), (i + 0.3) / 255)}


def test_fresh_batches_never_repeat_a_clip():
    """--fresh: the batch of step s on rank r is clips (s * world + r) * batch_size onward of the
    'train' stream, at the pool's uint8 precision: over steps and ranks every clip is new."""
    args = wm.Args(context=2, horizon=3, batch_size=3)
    ds = _Numbered()
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        for rank in range(2):
            x, _ = wm.fresh_batch(ds, step, gen, args, torch.device("cpu"), rank, 2)
            assert x.shape == (3, 5, 1, 2, 2)
            first = (step * 2 + rank) * 3
            want = torch.tensor([first, first + 1, first + 2]).float()
            assert torch.allclose(x[:, :, 0, 0, 0] * 255, want[:, None].expand(3, 5), atol=1e-4)
    assert sorted(ds.asked) == list(range(24))


def test_benchmark_run_on_a_test_layout_file(tmp_path, capsys):
    """Fresh Moving MNIST clips, an 8x8 latent grid at 32 px (/ 4; the default / 8 gives 4x4),
    evaluated on a file in the standard time-first test layout written by toy_data.py; the
    summary gives MSE, MAE, both SSIMs and copy_last."""
    test_file = str(tmp_path / "mnist_test_seq.npy")
    wm.toy_data.main(
        ["--kind", "moving_mnist", "--split", "test", "--num", "4", "--frames", "5"]
        + ["--out", test_file]
    )
    run(
        tmp_path / "run",
        *["--data", "moving_mnist", "--fresh", "--latent-grid", "8", "--rollout", "2"],
        *["--test-file", test_file, "--frames", "5", "--steps", "2", "--eval-every", "2"],
    )
    out = capsys.readouterr().out
    assert "new training clips every step" in out and "4x8x8 latents" in out
    last = out.strip().splitlines()[-2]
    for text in (
        "test prediction of 2 frames after 3",
        "MSE",
        "MAE",
        "published tables'",
        "copy_last",
    ):
        assert text in last, text
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["data"]["test_file"] == test_file and m["data"]["n_eval"] == 3
    assert {"mae_frame_sum", "ssim_openstl"} <= m["eval"].keys()
    assert load(tmp_path / "run" / "ckpt.pt")["arch"]["grid"] == 8


def test_a_test_file_is_never_trained_on(tmp_path):
    test_file = tmp_path / "mnist_test_seq.npy"
    np.save(test_file, np.zeros((9, 4, 32, 32), np.uint8))
    for flags in (["--data-dir", str(test_file)], ["--data", "npz", "--data-dir", str(test_file)]):
        with pytest.raises(SystemExit, match="is a test set .*never as val data") as e:
            run(tmp_path, *flags)
        assert "\n" not in str(e.value.code)
    with pytest.raises(SystemExit, match="--test-file .* has 1-channel videos, --data "):
        run(tmp_path, "--test-file", str(test_file))  # bouncing balls are RGB
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "args.json").exists()
