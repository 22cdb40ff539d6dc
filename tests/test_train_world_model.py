"""train_world_model.py: CLI, outputs, dynamics shapes, rollout on own predictions, losses,
determinism, resume, eval-only, DDP, bad input."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import tyro

import train_world_model as wm

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: more threads only contend on a busy CPU

TINY = (
    "--steps 4 --log-every 1 --eval-every 2 --sample-every 2 --ckpt-every 2 "
    "--resolution 32 --frames 6 --context 3 --horizon 2 --train-clips 4 --eval-clips 3 "
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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    assert m["val"]["best_loss"] == ck["best_val"] and m["val"]["loss"] > 0
    assert m["perf"]["train_samples_per_s"] > 0 and m["perf"]["mfu"] is None  # no peak known on CPU
    assert m["perf"]["gen_frames_per_s"] > 0
    data = {"kind": "bouncing_balls", "resolution": 32, "n_eval": 3}
    assert m["data"] == {**data, "context": 3, "horizon": 2, "rollout": 6}
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
    x = wm.sample_batch(pool, torch.Generator().manual_seed(0), args, torch.device("cpu"))
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
    assert ma["eval"]["psnr"] == mb["eval"]["psnr"] and ma["val"]["loss"] == mb["val"]["loss"]


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
    before = digest(tiny / "ckpt.pt")
    run(tmp_path, "--eval-only", "--ckpt", str(tiny / "ckpt.pt"))
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tiny, tmp_path))
    pairs = {
        "eval": (a["eval"], b["eval"]),
        "baselines": (a["baselines"]["copy_last"], b["baselines"]["copy_last"]),
    }
    for part, (x, y) in pairs.items():
        for k in ("psnr", "ssim", "mse_frame_sum", "psnr_rollout"):
            assert y[k] == pytest.approx(x[k], rel=1e-6), (part, k)
        assert y["psnr_per_frame"] == pytest.approx(x["psnr_per_frame"], rel=1e-6)
    assert b["perf"]["train_samples_per_s"] is None and b["step"] == 4
    assert digest(tiny / "ckpt.pt") == before and not (tmp_path / "ckpt.pt").exists()
    assert (tmp_path / "plots" / "horizon.png").exists()
    assert (tmp_path / "samples" / "rollout_000004.gif").exists()
    run(tmp_path / "best", "--eval-only", "--ckpt", str(tiny / "ckpt_best.pt"), "--rollout", "9")
    m = json.loads((tmp_path / "best" / "metrics.json").read_text())
    assert len(m["eval"]["psnr_per_frame"]) == 9
    assert m["step"] == load(tiny / "ckpt_best.pt")["step"]


def test_transformer_and_lstm_train(tmp_path):
    for dyn in ("transformer", "lstm"):
        run(tmp_path / dyn, "--dynamics", dyn, *"--steps 2 --eval-every 9 --sample-every 9".split())
        m = json.loads((tmp_path / dyn / "metrics.json").read_text())
        assert load(tmp_path / dyn / "ckpt.pt")["arch"]["dynamics"] == dyn and m["val"]["loss"] > 0


def test_torchrun_two_cpu_processes(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [*torchrun, "train_world_model.py", *TINY, "--out-dir", str(tmp_path / "run")]
    cmd += ["--eval-every", "100", "--sample-every", "100"]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    # a rare gloo abort at process exit, seen in full-suite runs only: once more
    if r.returncode and "terminate called without an active exception" in r.stderr:
        cmd += ["--no-resume"]
        r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
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
        (
            ["--data", "folder", "--data-dir", "/nonexistent/videos"],
            "error: video folder /nonexistent/videos does not exist",
        ),
        (["--resolution", "36"], "error: --resolution 36"),
        (["--frames", "4"], "error: need .*--frames >= --context \\+ --horizon"),
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
