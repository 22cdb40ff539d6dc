"""train_river.py: flow-matching path, ODE solvers, frame-index invariants, constant cost, learning, frozen first stage,
CLI and outputs, determinism, resume, eval-only, bench, DDP, bad input."""

import contextlib
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import tyro
from conftest import assert_flop_rate, torchrun

import train_river as tr

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: more threads only contend on a busy CPU
SIGMA = 1e-7

TINY = [
    "--steps",
    "4",
    "--log-every",
    "1",
    "--eval-every",
    "2",
    "--sample-every",
    "2",
    "--ckpt-every",
    "2",
    "--resolution",
    "32",
    "--frames",
    "6",
    "--context",
    "3",
    "--horizon",
    "3",
    "--rollout",
    "4",
    "--train-clips",
    "4",
    "--eval-clips",
    "3",
    "--width",
    "16",
    "--heads",
    "2",
    "--depth",
    "1",
    "--mid-depth",
    "1",
    "--batch-size",
    "4",
    "--dtype",
    "float32",
    "--no-compile",
    "--device",
    "cpu",
    "--warmup-steps",
    "1",
    "--ode-steps",
    "3",
    "--val-draws",
    "2",
    "--bench-frames",
    "2",
    "5",
]
VQVAE_TINY = (  # train_vqvae.py at 2 steps; --resolution and --out-dir are added
    "--steps 2 --frames 4 --train-clips 4 --eval-clips 2 --width 8 --codebook-size 16 "
    "--batch-size 8 --dtype float32 --no-compile --device cpu --warmup-steps 1"
).split()
FIRST_STAGE_FILES = ("first_stage.json", "first_stage_encode.pt2", "first_stage_decode.pt2")


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory, one_thread):
    """A tiny exported first stage (32 px smoke -> 4x4x4 latents): train_vqvae.py at 2 steps, run as a user would."""
    out = tmp_path_factory.mktemp("vqvae")
    cmd = [
        sys.executable,
        "train_vqvae.py",
        *VQVAE_TINY,
        "--resolution",
        "32",
        "--out-dir",
        str(out),
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def run(out_dir, first_stage, *extra):
    tr.main(
        tyro.cli(
            tr.Args, args=[*TINY, "--vqvae", str(first_stage), "--out-dir", str(out_dir), *extra]
        )
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, first_stage):
    before = {f: digest(first_stage / f) for f in FIRST_STAGE_FILES}
    out = tmp_path_factory.mktemp("tiny")
    run(out, first_stage)
    return out, before


# ----------------------------------------------------------------------------- path and objective
def test_path_endpoints_and_closed_form_target():
    torch.manual_seed(0)
    z1, eps = torch.randn(2, 5, 4, 8, 8)
    x0, u = tr.flow_path(z1, eps, torch.zeros(5), SIGMA)
    assert torch.equal(x0, eps)  # t = 0: pure noise
    x1, _ = tr.flow_path(z1, eps, torch.ones(5), SIGMA)
    assert (x1 - z1).abs().max() < 1e-6  # t -> 1: the data, up to sigma * eps
    assert torch.allclose(u, z1 - (1 - SIGMA) * eps)  # independent of t
    t = torch.tensor([0.0, 0.3, 0.6, 0.9, 0.99])
    x_t, u = tr.flow_path(z1, eps, t, SIGMA)
    division = (z1 - (1 - SIGMA) * x_t) / (
        1 - (1 - SIGMA) * t.view(-1, 1, 1, 1)
    )  # the public code's form
    assert torch.allclose(u, division, atol=2e-4)


def test_target_points_from_noise_to_data():
    torch.manual_seed(1)
    z1, eps = torch.randn(2, 6, 4, 4, 4)
    t = torch.rand(6)
    x_t, u = tr.flow_path(z1, eps, t, SIGMA)
    assert torch.allclose(tr.predicted_endpoint(x_t, u, t, SIGMA), z1, atol=1e-5)
    assert not torch.allclose(
        tr.predicted_endpoint(x_t, -u, t, SIGMA), z1, atol=1e-1
    )  # a flipped sign misses
    dt = 1e-3  # moving along u moves x_t along the path towards the data
    assert torch.allclose(tr.flow_path(z1, eps, t + dt, SIGMA)[0], x_t + dt * u, atol=1e-5)


@pytest.mark.parametrize("solver", ["euler", "rk4"])
@pytest.mark.parametrize("start", [0.0, 0.3])
@pytest.mark.parametrize("steps", [2, 7])
def test_oracle_field_integration_lands_on_target(solver, start, steps):
    """The oracle field's trajectories are straight lines, so even one Euler step lands on x1 (+ sigma * noise).
    float64: at t = 1 the oracle divides by sigma, which float32 rounding cannot survive (a learned field never divides)."""
    torch.manual_seed(2)
    x1, frame, eps = torch.randn(3, 4, 4, 8, 8, dtype=torch.float64)

    def oracle(t, y):
        return (x1 - (1 - SIGMA) * y) / (1 - (1 - SIGMA) * t)

    grid = tr.time_grid(steps, start)
    assert grid[0] == start and grid[-1] == 1 and len(grid) >= 2
    y0 = (1 - (1 - SIGMA) * start) * eps + start * frame  # warm start from any frame
    assert (tr.integrate(oracle, y0, grid, solver) - x1).abs().max() < 1e-5
    assert (
        tr.integrate(lambda t, y: -oracle(t, y), y0, grid, solver) - x1
    ).abs().max() > 0.1  # a sign flip misses


def test_lr_warm_up_then_square_root_decay_to_a_thousandth():
    peak, total, warmup = 2.0, 110, 10  # RIVER's schedule, not the fenced cosine lr_at
    assert tr.river_lr_at(0, total, peak, warmup) == pytest.approx(0.2)
    assert tr.river_lr_at(9, total, peak, warmup) == pytest.approx(peak)
    assert tr.river_lr_at(60, total, peak, warmup) == pytest.approx(
        peak * (1e-3 + 0.999 * 0.5**0.5)
    )
    assert tr.river_lr_at(total, total, peak, warmup) == pytest.approx(peak * 1e-3)
    assert tr.river_lr_at(10 * total, total, peak, warmup) == pytest.approx(peak * 1e-3)


# ----------------------------------------------------------------------------- frame indices
def test_training_indices_invariants():
    gen = torch.Generator().manual_seed(0)
    for n in (3, 6, 16):
        tau, ctx, delta = tr.training_indices(n, 20000, gen)
        assert tau.min() == 2 and tau.max() == n - 1  # every target from frame 2 to n-1
        assert (ctx >= 0).all() and (ctx <= tau - 2).all()  # strictly before the reference tau - 1
        assert torch.equal(delta, tau - 1 - ctx) and delta.min() == 1 and delta.max() == n - 2
        assert set(ctx[tau == n - 1].tolist()) == set(
            range(n - 2)
        )  # every frame before the reference reachable


def test_context_indices_invariants_and_past_horizon():
    gen = torch.Generator().manual_seed(0)
    for length in (2, 5, 30):
        c, delta = tr.context_indices(length, 5000, 0, gen)
        assert set(c.tolist()) == set(range(length - 1))  # anything but the reference
        assert torch.equal(delta, length - 1 - c) and delta.min() >= 1
    c, delta = tr.context_indices(
        10, 5000, 3, gen
    )  # horizon 3: the reference and 2 frames before it
    assert set(c.tolist()) == {7, 8} and set(delta.tolist()) == {1, 2}
    c, _ = tr.context_indices(
        3, 5000, 10, gen
    )  # a horizon longer than the history restricts nothing
    assert set(c.tolist()) == {0, 1}  # and never goes negative (the public code's min() bug)


def test_river_inputs_pick_frames_by_those_indices():
    clips = (
        torch.arange(7.0).view(1, 7, 1, 1, 1).expand(64, 7, 2, 3, 3).contiguous()
    )  # frame i is all i
    (x_t, t, ref, ctx, delta), u, z1 = tr.river_inputs(
        clips, torch.Generator().manual_seed(0), SIGMA
    )
    tau, r, c = z1[:, 0, 0, 0], ref[:, 0, 0, 0], ctx[:, 0, 0, 0]
    assert torch.equal(r, tau - 1) and (c <= tau - 2).all() and torch.equal(delta.float(), r - c)
    assert ((t >= 0) & (t < 1)).all() and x_t.shape == u.shape == (64, 2, 3, 3)


class Oracle(torch.nn.Module):
    """Stands in for the regressor: records what the sampler feeds it, returns the oracle field towards
    reference + 1, so with history frame i filled with i every generated frame continues the count."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, ref, ctx, delta):
        self.calls.append(
            {
                "shapes": (x.shape, ref.shape, ctx.shape, delta.shape, t.shape),
                "t": t[0].item(),
                "ref": ref.mean((1, 2, 3)),
                "ctx": ctx.mean((1, 2, 3)),
                "delta": delta.clone(),
            }
        )
        return (ref + 1 - (1 - SIGMA) * x) / (1 - (1 - SIGMA) * t.double().view(-1, 1, 1, 1))


def counting_history(batch, length):
    """float64, so the oracle's division by sigma at t = 1 (RK4's last stage) stays exact enough to land."""
    return (
        torch.arange(float(length), dtype=torch.float64)
        .view(1, length, 1, 1, 1)
        .expand(batch, length, 2, 3, 3)
        .contiguous()
    )


@pytest.mark.parametrize("horizon", [0, 3])
def test_sampler_index_invariants(horizon):
    spy, hist = Oracle(), counting_history(16, 4)
    z, nfe = tr.generate(
        spy,
        hist,
        6,
        steps=5,
        solver="rk4",
        past_horizon=horizon,
        gen=torch.Generator().manual_seed(0),
    )
    assert (
        z - torch.arange(4.0, 10.0).view(1, 6, 1, 1, 1)
    ).abs().max() < 1e-4  # solved latents join the history
    assert nfe == len(spy.calls) == 6 * 4 * 4
    per_frame = [spy.calls[i : i + 16] for i in range(0, nfe, 16)]
    for k, calls in enumerate(per_frame):
        length = 4 + k
        for call in calls:
            assert torch.allclose(
                call["ref"], torch.full((16,), length - 1.0, dtype=torch.float64), atol=1e-4
            )  # newest
            c = call["ctx"].round()
            assert (call["ctx"] - c).abs().max() < 1e-4  # a history frame, not noise
            assert (c >= (max(0, length - horizon) if horizon else 0)).all() and (
                c <= length - 2
            ).all()
            assert torch.equal(call["delta"].double(), length - 1 - c)
        draws = torch.stack([call["ctx"].round() for call in calls])  # (evaluations, batch)
        assert (
            (draws != draws[:1]).any(0).all()
        )  # each element's context changes between evaluations
        assert (draws != draws[:, :1]).any(1).all()  # the elements of one evaluation draw their own
    assert [round(call["t"], 6) for call in per_frame[0][:4]] == [
        0.0,
        round(0.25 / 3, 6),
        round(0.5 / 3, 6),
        0.25,
    ]


def test_one_observed_frame_is_duplicated_as_context():
    spy = Oracle()
    z, _ = tr.generate(spy, counting_history(2, 1), 2, steps=2, solver="euler")
    assert torch.equal(spy.calls[0]["ctx"], spy.calls[0]["ref"]) and spy.calls[0][
        "delta"
    ].tolist() == [1, 1]
    assert (
        z.shape == (2, 2, 2, 3, 3)
        and (z[:, :, 0, 0, 0] - torch.tensor([1.0, 2.0])).abs().max() < 1e-4
    )


# ----------------------------------------------------------------------------- constant cost
@pytest.mark.parametrize(
    "steps, start", [(10, 0.0), (10, 0.2), (100, 0.0), (100, 0.2), (100, 0.15), (7, 0.5), (2, 0.5)]
)
def test_nfe_formula(steps, start):
    for solver, per_step in (("rk4", 4), ("euler", 1)):
        spy = Oracle()
        _, nfe = tr.generate(spy, counting_history(1, 3), 2, steps, solver, start)
        expected = per_step * (
            max(2, int((1 - start) * steps)) - 1
        )  # RIVER's grid; at least 2 points
        assert nfe == len(spy.calls) == 2 * expected
        _, nfe_cold = tr.generate(Oracle(), counting_history(1, 3), 2, steps, solver, 0.0)
        assert nfe < nfe_cold or start == 0 or steps == 2
    assert 4 * (int(0.8 * 100) - 1) == 316 < 396  # s = 0.2 at RIVER's 100 steps


def test_regressor_input_shapes_independent_of_history_length():
    torch.manual_seed(0)
    model = tr.VectorField(channels=2, grid=3, width=16, heads=2, depth=1, mid_depth=1).eval()
    seen = []
    model.down[0].register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape)))
    spy = Oracle()
    for length in (2, 9, 40):
        tr.generate(model, torch.randn(3, length, 2, 3, 3), 2, steps=3)
        tr.generate(spy, counting_history(3, length), 2, steps=3)
    assert set(seen) == {
        (3, 3 * 3 + 1, 16)
    }  # h*w cell tokens + the time token, whatever the history
    assert {c["shapes"] for c in spy.calls} == {((3, 2, 3, 3),) * 3 + ((3,), (3,))}


# ----------------------------------------------------------------------------- learning
def test_learns_to_use_context_and_beats_copy_last():
    """Latents moving at a per-clip constant velocity: the velocity can only be read from reference - context over
    delta, so a model that learns must use the context and the distance."""
    torch.manual_seed(0)
    a, b = torch.randn(512, 1, 2, 2, 2), 0.3 * torch.randn(512, 1, 2, 2, 2)
    clips = a + b * torch.arange(6.0).view(1, 6, 1, 1, 1)
    model = tr.VectorField(channels=2, grid=2, width=32, heads=2, depth=1, mid_depth=1, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    args = tr.Args(val_draws=8, seed=0)
    init = tr.validation_losses(
        model.eval(), clips[:128], args, torch.device("cpu"), torch.autocast("cpu", enabled=False)
    )
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(400):
        loss, _ = tr.river_loss(model, clips[torch.randint(len(clips), (64,), generator=gen)], gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    val = tr.validation_losses(
        model.eval(), clips[:128], args, torch.device("cpu"), torch.autocast("cpu", enabled=False)
    )
    assert val["loss"] < 0.5 * init["loss"]
    assert val["endpoint_mse"] < 0.5 * val["endpoint_mse_copy_last"]
    assert val["loss_context_is_reference"] > 1.2 * val["loss"]


# ----------------------------------------------------------------------------- CLI, outputs, frozen first stage
def test_help_shows_field_docs():
    r = subprocess.run(
        [sys.executable, "train_river.py", "--help"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    for text in (
        "--warm-start",
        "--past-horizon",
        "--solver {rk4,euler}",
        "--vqvae",
        "--bench, --no-bench",
        "--compile, --no-compile",
        "--resume, --no-resume",
        "--eval-only",
        "3/8 rule",
        "bfloat16",
    ):
        assert text in r.stdout, text


def test_tiny_run_writes_outputs(tiny):
    out, _ = tiny
    ck = load(out / "ckpt.pt")
    assert ck["script"] == "train_river.py" and ck["step"] == 4 and ck["arch"]["width"] == 16
    assert {"model", "optimizer", "scaler", "rng", "arch"} <= ck.keys() and len(
        ck["rng"]["data"]
    ) == 1
    assert "_orig_mod" not in "".join(ck["model"]) and len(ck["arch"]["first_stage"]) == 12
    assert list(out.glob("events.out.tfevents.*"))
    m = json.loads((out / "metrics.json").read_text())
    assert m["script"] == "train_river.py" and m["step"] == 4
    ours, base, auto = m["eval"], m["baselines"]["copy_last"], m["baselines"]["first_stage"]
    assert (
        ours.keys() == base.keys() == auto.keys()
        and {"psnr", "ssim", "mse", "mse_frame_sum", "fd_probe"} <= ours.keys()
    )
    for key in ("psnr_per_frame", "ssim_per_frame", "mse_frame_sum_per_frame"):
        assert len(ours[key]) == len(base[key]) == 3
    assert ours["psnr"] == pytest.approx(sum(ours["psnr_per_frame"]) / 3)
    assert base["mse_frame_sum"] == pytest.approx(32 * 32 * 3 * base["mse"])
    assert m["losses"]["loss"] > 0 and m["losses"]["loss_context_is_reference"] > 0
    assert m["losses"]["endpoint_mse_copy_last"] > 0
    assert m["perf"]["nfe_per_frame"] == 4 * (3 - 1) and m["perf"]["gen_s_per_frame"] > 0
    assert m["perf"]["train_samples_per_s"] > 0
    assert_flop_rate(m["perf"])
    assert m["sampler"] == {"solver": "rk4", "ode_steps": 3, "warm_start": 0.0, "past_horizon": 5}
    assert m["data"]["kind"] == "smoke" and m["data"]["n_eval"] == 3 and m["data"]["horizon"] == 3
    assert m["data"]["split"] == "test"  # figures on test clips; val clips only during training
    # copy_last needs no model: its figures pin the clips they come from (test, not val)
    for split, same in (("test", True), ("val", False)):
        ds = tr.toy_data.make_dataset("smoke", 3, 32, 6, seed=0, split=split)
        clips = torch.stack([(ds[i]["video"] * 255).round() / 255 for i in range(3)])
        err = ((clips[:, 2:3] - clips[:, 3:]) ** 2).sum((2, 3, 4)).mean()
        assert (base["mse_frame_sum"] == pytest.approx(float(err), rel=1e-5)) == same, split
    for f in (
        "samples/rollout_000002.gif",
        "samples/rollout_000004.gif",
        "samples/rollout_latest.png",
        "plots/horizon.png",
        "plots/horizon_ssim.png",
        "plots/training_curves.png",
    ):
        assert (out / f).stat().st_size > 0, f


def test_first_stage_frozen_and_unchanged(tiny, first_stage):
    out, before = tiny
    assert {f: digest(first_stage / f) for f in FIRST_STAGE_FILES} == before
    assert all(
        k.startswith(("inp", "rows", "cols", "dist", "down", "mid", "up", "skip", "head", "out"))
        for k in load(out / "ckpt.pt")["model"]
    )  # only the regressor is trained and saved
    args = tyro.cli(tr.Args, args=[*TINY, "--vqvae", str(first_stage)])
    (encode, decode, stats), meta, _ = tr.load_first_stage(str(first_stage), args)
    assert not any(p.requires_grad for m in (encode, decode) for p in m.parameters())
    assert (
        meta["latent_shape"] == [4, 4, 4]
        and stats[1].shape == (1, 4, 1, 1)
        and (stats[1] > 0).all()
    )


# ----------------------------------------------------------------------------- determinism, resume, eval-only, bench
def test_same_seed_same_run(tiny, first_stage, tmp_path, capsys):
    run(tmp_path, first_stage, "--sample-every", "100")
    last = capsys.readouterr().out.splitlines()[-1]  # the summary, after the plots
    assert last.startswith("held-out prediction of 3 frames after 3: PSNR ")
    assert "(copy_last " in last and f"in {tmp_path}: ckpt.pt" in last and "tensorboard" in last
    a, b = load(tiny[0] / "ckpt.pt"), load(tmp_path / "ckpt.pt")
    assert same_state(a["model"], b["model"])
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (tiny[0], tmp_path))
    assert (
        ma["eval"]["psnr_per_frame"] == mb["eval"]["psnr_per_frame"]
        and ma["losses"] == mb["losses"]
    )


def test_ctrl_c_saves_and_resume_equals_straight_run(tiny, first_stage, tmp_path, monkeypatch):
    lr_at = tr.river_lr_at

    def ctrl_c_in_step_3(step, *schedule):  # Ctrl-C arrives in the middle of the third step
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return lr_at(step, *schedule)

    monkeypatch.setattr(tr, "river_lr_at", ctrl_c_in_step_3)
    with pytest.raises(SystemExit, match="interrupted after step 3"):
        run(tmp_path, first_stage)
    assert load(tmp_path / "ckpt.pt")["step"] == 3
    monkeypatch.setattr(tr, "river_lr_at", lr_at)
    run(tmp_path, first_stage)
    a, b = load(tiny[0] / "ckpt.pt"), load(tmp_path / "ckpt.pt")
    assert b["step"] == 4 and same_state(a["model"], b["model"])
    assert torch.equal(a["rng"]["data"][0], b["rng"]["data"][0]) and torch.equal(
        a["rng"]["torch"], b["rng"]["torch"]
    )
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)


def test_resume_with_other_sampling_flags(tiny, first_stage, tmp_path):
    """Flags that change only evaluation and sampling may differ on resume; training flags not."""
    d = tmp_path / "run"
    shutil.copytree(tiny[0], d)
    sampling = "--ode-steps 4 --warm-start 0.25 --solver euler --past-horizon 2 --val-draws 1"
    more = "--horizon 2 --eval-clips 2 --rollout 3 --bench-frames 3"
    run(d, first_stage, *sampling.split(), *more.split())
    assert json.loads((d / "metrics.json").read_text())["sampler"]["solver"] == "euler"
    assert same_state(load(d / "ckpt.pt")["model"], load(tiny[0] / "ckpt.pt")["model"])
    with pytest.raises(SystemExit, match="trained with --seed 0 --batch-size 4, not"):
        run(d, first_stage, "--batch-size", "2", "--seed", "1")


def test_eval_only_reproduces_eval(tiny, first_stage, tmp_path, capsys):
    before = digest(tiny[0] / "ckpt.pt")
    run(tmp_path, first_stage, "--eval-only", "--ckpt", str(tiny[0] / "ckpt.pt"))
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("held-out prediction") and f"in {tmp_path}: metrics.json" in last
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tiny[0], tmp_path))
    assert (
        b["eval"] == a["eval"] and b["baselines"] == a["baselines"] and b["losses"] == a["losses"]
    )
    assert b["perf"]["train_samples_per_s"] is None and b["step"] == 4
    assert digest(tiny[0] / "ckpt.pt") == before and not (tmp_path / "ckpt.pt").exists()
    assert (tmp_path / "plots" / "horizon.png").exists() and (
        tmp_path / "samples" / "rollout_000004.gif"
    ).exists()


def test_missing_probe_is_said_before_evaluating(tiny, first_stage, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOWORLD_PROBE", str(tmp_path / "no_probe.pt"))
    run(tmp_path, first_stage, "--eval-only", "--ckpt", str(tiny[0] / "ckpt.pt"))
    out = capsys.readouterr().out
    assert (
        out.index("warning: no probe at") < out.index("test step")
        and "python train_probe.py" in out
    )
    row = json.loads((tmp_path / "metrics.json").read_text())["eval"]
    assert row["fd_probe"] is None and "train_probe.py" in row["fd_probe_unavailable"]


def test_bench_warm_start_and_video(tiny, first_stage, tmp_path):
    ck = str(tiny[0] / "ckpt.pt")
    run(tmp_path, first_stage, "--bench", "--ckpt", ck, "--ode-steps", "6")
    b = json.loads((tmp_path / "metrics.json").read_text())["bench"]
    assert b["frames"].keys() == {"2", "5"} and {
        v["nfe_per_frame"] for v in b["frames"].values()
    } == {4 * (6 - 1)}
    assert all(v["s_per_frame"] > 0 for v in b["frames"].values())
    run(
        tmp_path / "ws",
        first_stage,
        "--eval-only",
        "--ckpt",
        ck,
        "--ode-steps",
        "6",
        "--warm-start",
        "0.5",
    )
    assert json.loads((tmp_path / "ws" / "metrics.json").read_text())["perf"][
        "nfe_per_frame"
    ] == 4 * (int(0.5 * 6) - 1)
    clip = torch.rand(5, 3, 40, 48)
    import viz

    viz.create_video_gif(clip, tmp_path / "mine.gif")
    run(tmp_path / "v", first_stage, "--video", str(tmp_path / "mine.gif"), "--ckpt", ck)
    from PIL import Image

    assert Image.open(tmp_path / "v" / "samples" / "video_mine.gif").n_frames == 3 + 4


@pytest.mark.slow  # fresh processes: the world model's torchrun test covers the shared DDP code fast
def test_torchrun_two_cpu_processes(first_stage, tmp_path):
    args = [
        "train_river.py",
        *TINY,
        "--vqvae",
        str(first_stage),
        "--out-dir",
        str(tmp_path / "run"),
        "--eval-every",
        "100",
        "--sample-every",
        "100",
    ]
    r = torchrun(args, ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load(tmp_path / "run" / "ckpt.pt")
    assert ck["step"] == 4 and len(ck["rng"]["data"]) == 2
    assert not torch.equal(ck["rng"]["data"][0], ck["rng"]["data"][1])  # ranks draw different clips
    assert "world 2" in r.stdout and "2 training clips/rank" in r.stdout
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["step"] == 4


def test_encoding_shows_progress(monkeypatch, capsys):
    clock = iter(range(0, 1000, 2))  # 2 s between readings of the clock
    monkeypatch.setattr(tr, "time", type("Clock", (), {"perf_counter": lambda: next(clock)}))
    clips = torch.zeros(3, 2, 1, 8, 8, dtype=torch.uint8)
    stats = [torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)]
    z = tr.encode_clips(lambda x: x, clips, stats, batch=2, what="encoding train clips")
    assert z.shape == clips.shape
    assert "encoding train clips (2 frames a batch): 1/3, 4 s, ETA 8 s" in capsys.readouterr().out
    tr.encode_clips(lambda x: x, clips, stats, batch=2)  # no `what`: quiet
    assert capsys.readouterr().out == ""


# ----------------------------------------------------------------------------- bad input
def test_missing_first_stage_says_how_to_make_it(tmp_path, first_stage):
    with pytest.raises(
        SystemExit,
        match="error: no first stage in .*make one with `python train_vqvae.py --resolution 32 "
        f"--out-dir {tmp_path / 'none'}`",
    ) as e:
        run(tmp_path, first_stage, "--vqvae", str(tmp_path / "none"))
    assert "\n" not in str(e.value.code) and not (tmp_path / "args.json").exists()


def suggested(message, *tiny):
    """The train_vqvae.py command an error line suggests, as argv, with tiny settings added."""
    cmd = shlex.split(message.split("`")[1])
    assert cmd[:2] == ["python", "train_vqvae.py"], message
    return [sys.executable, str(ROOT / "train_vqvae.py"), *cmd[2:], *tiny]


@pytest.mark.slow  # trains first stages in fresh processes
def test_suggested_first_stage_commands_work(tmp_path, first_stage, monkeypatch):
    """Each train_vqvae.py command an error suggests makes a first stage this run accepts."""
    monkeypatch.chdir(tmp_path)  # the suggested runs/ folders are relative
    shapes = tyro.cli(tr.Args, args=[*TINY, "--data", "shapes"])
    with pytest.raises(SystemExit, match="no first stage in fs .*; make one with `") as e:
        run(tmp_path / "river", first_stage, "--vqvae", "fs", "--data", "shapes")
    subprocess.run(suggested(e.value.code, *VQVAE_TINY), env=ENV, check=True, capture_output=True)
    assert tr.load_first_stage("fs", shapes)[1]["data"] == "shapes"
    new = "runs/train_vqvae_shapes_32"
    with pytest.raises(SystemExit, match=f"32 px; make one .* --vqvae {new}$") as e:
        run(tmp_path / "river", first_stage, "--data", "shapes")  # the smoke one
    subprocess.run(suggested(e.value.code, *VQVAE_TINY), env=ENV, check=True, capture_output=True)
    with pytest.raises(SystemExit, match=f"not --data shapes at 32 px; a matching one is in {new}"):
        run(tmp_path / "river", first_stage, "--data", "shapes")
    (tmp_path / "half").mkdir()  # a run without an exported first stage: made elsewhere
    torch.save({"script": "train_vqvae.py"}, tmp_path / "half" / "ckpt.pt")
    with pytest.raises(SystemExit, match=f"no first stage in half .*a matching one is in {new}"):
        run(tmp_path / "river", first_stage, "--data", "shapes", "--vqvae", "half")
    assert tr.load_first_stage(new, shapes)[1]["data"] == "shapes"


def test_mismatched_first_stage(tmp_path, first_stage, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ folder that holds a matching first stage
    with pytest.raises(
        SystemExit,
        match="error: the first stage in .* was trained on --data smoke at 32 px, not --data "
        "smoke at 64 px",
    ) as e:
        run(tmp_path, first_stage, "--resolution", "64")
    assert "\n" not in str(e.value.code)
    shapes = tmp_path / "shapes_fs"
    shutil.copytree(first_stage, shapes)
    meta = json.loads((shapes / "first_stage.json").read_text())
    (shapes / "first_stage.json").write_text(json.dumps({**meta, "data": "shapes"}))
    with pytest.raises(
        SystemExit,
        match="error: the first stage in .* was trained on --data shapes at 32 px, not --data "
        "smoke at 32 px; .*python train_vqvae.py --resolution 32",
    ):
        run(tmp_path, first_stage, "--vqvae", str(shapes))
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "args.json").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "nonsense"], "error: unknown data kind 'nonsense'"),
        (["--frames", "2"], "error: need --frames >= 3"),
        (["--past-horizon", "1"], "error: need .*--past-horizon 0 or >= 2"),
        (["--warm-start", "1.0"], "error: need 0 <= --warm-start < 1"),
        (["--ckpt", "/nonexistent/ckpt.pt"], "error: --ckpt /nonexistent/ckpt.pt does not exist"),
        (["--eval-only"], "error: --eval-only, --bench and --video need a checkpoint"),
        (["--bench"], "error: --eval-only, --bench and --video need a checkpoint"),
        (["--eval-every", "0"], "error: --eval-every 0 must be at least 1"),
        (["--train-clips", "0"], "error: --train-clips 0 must be at least 1"),
        (["--heads", "3"], "error: --heads 3 must divide --width 16"),
        # data and resolution are checked before the first stage (a 32 px smoke one), whose
        # mismatch error would suggest a train_vqvae.py command that fails the same way
        (["--resolution", "7"], "error: --resolution 7 is not a positive multiple of 8"),
        (["--resolution", "36"], "error: --resolution 36 is not a positive multiple of 8"),
        (["--data", "folder"], "error: --data folder needs --data-dir"),
        (["--data", "folder", "--data-dir", "/nonexistent"], "video folder /nonexistent does not"),
        (["--data", "npz", "--data-dir", "/nonexistent.npz"], "/nonexistent.npz does not exist"),
        (["--data", "moving_mnist", "--data-dir", "/nonexistent"], "MNIST path /nonexistent does"),
        # a --data-dir is never ignored: it implies its kind, or stops
        (["--data-dir", "/nonexistent"], "error: --data-dir /nonexistent does not exist"),
        (["--data", "pendulum", "--data-dir", "/"], "error: --data pendulum is generated"),
    ],
)
def test_bad_input_one_line(tmp_path, first_stage, extra, message):
    with pytest.raises(SystemExit, match=message) as e:
        run(tmp_path, first_stage, *extra)
    assert "\n" not in str(e.value.code)
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "args.json").exists()


def test_checkpoint_of_another_script(tmp_path, first_stage):
    torch.save({"script": "train_vqvae.py", "step": 3, "model": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit, match="error: .*written by train_vqvae.py, not train_river.py"):
        run(tmp_path, first_stage)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="error: cannot read checkpoint"):
        run(tmp_path, first_stage, "--eval-only", "--ckpt", str(tmp_path / "bad.pt"))


def test_failing_runs_keep_good_checkpoint(tiny, first_stage, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(tiny[0], d)
    good = digest(d / "ckpt.pt")
    with pytest.raises(SystemExit, match="error: .*another architecture: width=16 \\(now 32\\)"):
        run(d, first_stage, "--width", "32")
    other = tmp_path / "other_fs"  # another first stage: its latents mean something else
    shutil.copytree(first_stage, other)
    meta = json.loads((other / "first_stage.json").read_text())
    (other / "first_stage.json").write_text(
        json.dumps({**meta, "latent_std": [2 * s for s in meta["latent_std"]]})
    )
    with pytest.raises(SystemExit, match="error: .*another architecture: first_stage="):
        run(d, other)
    with pytest.raises(SystemExit, match="trained with --steps 4 --lr 0.001, not --steps 12"):
        run(d, first_stage, "--steps", "12", "--lr", "1e30")  # would reshape the schedule: refused
    with pytest.raises(SystemExit, match="error: non-finite loss"):
        run(
            d,
            first_stage,
            "--accept-changed-args",
            "--steps",
            "12",
            "--lr",
            "1e30",
            "--ckpt-every",
            "100",
            "--eval-every",
            "100",
            "--sample-every",
            "100",
        )
    assert digest(d / "ckpt.pt") == good


# ----------------------------------------------------------------------------- method pinned against independent computations
# Every test below checks the script against a hand-computed case, a closed form or a plain
# reference written out here, never against the function's own output. The oracle-field tests above
# cannot tell solvers apart (its trajectories are straight lines, so any weights summing to 1 land),
# hence the nonlinear ODE, the written-out Butcher tableau and the warm-start start point.
S = 0.3  # a large sigma_min, so that a formula that drops it is visible in float32 and float64


def test_path_and_target_with_sigma_by_hand():
    """Invariant: x_t = (1 - (1 - sigma) t) eps + t z1 and u = z1 - (1 - sigma) eps, with sigma in
    both (hand-computed at sigma = 0.3, then the formula written out on random tensors)."""
    z1 = torch.tensor([2.0, 1.0]).view(2, 1, 1, 1)
    eps = torch.tensor([-1.0, 3.0]).view(2, 1, 1, 1)
    x_t, u = tr.flow_path(z1, eps, torch.tensor([0.5, 0.25]), S)
    # (1 - 0.7 * 0.5) * -1 + 0.5 * 2 = 0.35; (1 - 0.7 * 0.25) * 3 + 0.25 * 1 = 2.725
    assert torch.allclose(x_t.flatten(), torch.tensor([0.35, 2.725]), atol=1e-6), x_t.flatten()
    # 2 - 0.7 * -1 = 2.7; 1 - 0.7 * 3 = -1.1
    assert torch.allclose(u.flatten(), torch.tensor([2.7, -1.1]), atol=1e-6), u.flatten()
    g = torch.Generator().manual_seed(3)
    z1, eps = torch.randn(2, 6, 4, 3, 3, generator=g, dtype=torch.float64)
    t = torch.rand(6, generator=g, dtype=torch.float64)
    x_t, u = tr.flow_path(z1, eps, t, S)
    for i in range(6):
        ti = t[i].item()
        assert torch.allclose(x_t[i], (1 - (1 - S) * ti) * eps[i] + ti * z1[i], atol=1e-12)
        assert torch.allclose(u[i], z1[i] - (1 - S) * eps[i], atol=1e-12)


def test_predicted_endpoint_inverts_the_path_with_sigma():
    """Invariant: x1_hat = (1 - sigma) x_t + (1 - (1 - sigma) t) v (hand case at sigma = 0.3), and
    with v = u it inverts the path written out here: x1_hat = z1 for any t, eps."""
    x1 = tr.predicted_endpoint(
        torch.tensor([0.35]).view(1, 1, 1, 1), torch.ones(1, 1, 1, 1), torch.tensor([0.5]), S
    )
    assert x1.item() == pytest.approx(0.7 * 0.35 + 0.65 * 1.0)  # 0.895
    g = torch.Generator().manual_seed(4)
    z1, eps = torch.randn(2, 8, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.rand(8, generator=g, dtype=torch.float64)
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - (1 - S) * tt) * eps + tt * z1  # the path, written out
    u = z1 - (1 - S) * eps
    assert torch.allclose(tr.predicted_endpoint(x_t, u, t, S), z1, atol=1e-12)
    v = torch.randn(x_t.shape, generator=g, dtype=torch.float64)  # any field value
    want = (1 - S) * x_t + (1 - (1 - S) * tt) * v
    assert torch.allclose(tr.predicted_endpoint(x_t, v, t, S), want, atol=1e-12)


def test_training_example_noise_time_and_sigma():
    """Invariants of river_inputs: the example lies on the sigma path, with eps ~ N(0, 1) and
    t ~ U[0, 1) (eps recovered from x_t by hand; the target then must be z1 - (1 - sigma) eps)."""
    g = torch.Generator().manual_seed(5)
    clips = torch.randn(4096, 4, 2, 2, 2, generator=g)
    (x_t, t, ref, ctx, delta), u, z1 = tr.river_inputs(clips, g, S)
    tt = t.view(-1, 1, 1, 1)
    eps = (x_t - tt * z1) / (1 - (1 - S) * tt)
    assert torch.allclose(u, z1 - (1 - S) * eps, atol=1e-4), "target off the sigma path"
    assert abs(eps.mean().item()) < 0.02 and abs(eps.std().item() - 1) < 0.02, "eps not N(0, 1)"
    assert ((t >= 0) & (t < 1)).all()
    ks = (t.sort().values - torch.arange(len(t)) / len(t)).abs().max().item()
    assert ks < 0.03, f"t not uniform on [0, 1): KS distance {ks:.3f}"


class ExactField(torch.nn.Module):
    """On clips whose frames are all equal (z1 = reference), the target field written out."""

    def forward(self, x, t, ref, ctx, delta):
        return (ref - (1 - S) * x) / (1 - (1 - S) * t.view(-1, 1, 1, 1))


def test_loss_regresses_the_velocity_target():
    """Invariant: the loss is the MSE between the field and u = z1 - (1 - sigma) eps: on
    frame-constant clips the written-out exact field (z1 - (1 - sigma) x_t) / (1 - (1 - sigma) t)
    scores ~0, and the zero field scores the mean of u^2 (u recomputed by hand from x_t)."""
    g = torch.Generator().manual_seed(6)
    clips = torch.randn(256, 1, 2, 3, 3, generator=g).expand(-1, 5, -1, -1, -1).contiguous()
    loss, _ = tr.river_loss(ExactField(), clips, torch.Generator().manual_seed(7), S)
    assert loss.item() < 1e-9, loss.item()

    class Zero(torch.nn.Module):
        def forward(self, x, t, ref, ctx, delta):
            return torch.zeros_like(x)

    loss, ((x_t, t, *_), _, z1, _) = tr.river_loss(
        Zero(), clips, torch.Generator().manual_seed(7), S
    )
    tt = t.view(-1, 1, 1, 1)
    u = z1 - (1 - S) * (x_t - tt * z1) / (1 - (1 - S) * tt)
    assert loss.item() == pytest.approx(u.pow(2).mean().item(), rel=1e-4)


def _counts(values, support):
    return torch.tensor([(values == k).sum().item() for k in support], dtype=torch.float64)


def test_training_index_distributions():
    """Invariant: tau ~ U{2..n-1} and, given tau, the context c ~ U{0..tau-2} (uniform, strictly
    before the reference), over 120k seeded draws against the written-out probabilities."""
    n, draws = 6, 120_000
    tau, ctx, delta = tr.training_indices(n, draws, torch.Generator().manual_seed(8))
    freq = _counts(tau, range(2, n)) / draws
    assert (freq - 1 / (n - 2)).abs().max() < 0.01, freq
    for k in range(2, n):
        c = ctx[tau == k]
        freq = _counts(c, range(k - 1)) / len(c)
        assert freq.sum() == 1 and (freq - 1 / (k - 1)).abs().max() < 0.02, (k, freq)
    assert torch.equal(delta, tau - 1 - ctx)


def test_context_index_distribution_within_the_horizon():
    """Invariant: at sampling c ~ U{max(0, L - H)..L-2} (uniform over the horizon, never the
    reference), delta = L - 1 - c; over 60k seeded draws against the written-out probabilities."""
    g = torch.Generator().manual_seed(9)
    for length, horizon, lo in ((10, 6, 4), (7, 0, 0), (4, 9, 0)):
        c, delta = tr.context_indices(length, 60_000, horizon, g)
        freq = _counts(c, range(lo, length - 1)) / len(c)
        assert freq.sum() == 1, (length, horizon, c.unique())
        assert (freq - 1 / (length - 1 - lo)).abs().max() < 0.015, (length, horizon, freq)
        assert torch.equal(delta, length - 1 - c)


def test_time_grid_by_hand():
    """Invariant: the ODE grid is linspace(s, 1, max(2, int((1 - s) steps))), increasing from the
    warm start s to 1 (hand-written grids)."""
    assert tr.time_grid(5) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert tr.time_grid(10, 0.2) == pytest.approx([0.2 + 0.8 * i / 7 for i in range(8)])
    assert tr.time_grid(3, 0.5) == pytest.approx([0.5, 1.0])  # int(1.5) = 1 -> 2 points
    assert tr.time_grid(2) == pytest.approx([0.0, 1.0])


def _rk38_reference(f, y, grid):
    """The 3/8 rule written from its Butcher tableau (Kutta 1901), a generic explicit RK loop."""
    c = [0.0, 1 / 3, 2 / 3, 1.0]
    a = [[], [1 / 3], [-1 / 3, 1.0], [1.0, -1.0, 1.0]]
    b = [1 / 8, 3 / 8, 3 / 8, 1 / 8]
    for t0, t1 in zip(grid[:-1], grid[1:]):
        h = t1 - t0
        k = []
        for i in range(4):
            k.append(f(t0 + c[i] * h, y + h * sum(aij * kj for aij, kj in zip(a[i], k))))
        y = y + h * sum(bi * ki for bi, ki in zip(b, k))
    return y


def _nonlinear_field(t, y):
    """dy/dt = -2 t y^2 + sin(y): nonlinear and time-dependent."""
    return -2 * t * y**2 + torch.sin(y)


def test_rk4_is_the_3_8_rule_step_by_step():
    """Invariant: each rk4 step is Kutta's 3/8 rule (nodes 0, 1/3, 2/3, 1; weights 1/8, 3/8, 3/8,
    1/8) and each euler step is y + h f(t0, y): against a Butcher-tableau reference and a hand
    Euler step on a nonlinear, time-dependent field over an uneven grid, and the stage times."""
    y0 = torch.tensor([0.7, -0.4, 1.3], dtype=torch.float64)
    grid = [0.1, 0.35, 0.9, 1.0]
    got = tr.integrate(_nonlinear_field, y0, grid, "rk4")
    assert torch.allclose(got, _rk38_reference(_nonlinear_field, y0, grid), atol=1e-13, rtol=0)
    seen = []
    tr.integrate(lambda t, y: seen.append(t) or _nonlinear_field(t, y), y0, [0.1, 0.4], "rk4")
    assert seen == pytest.approx([0.1, 0.2, 0.3, 0.4])
    got = tr.integrate(_nonlinear_field, y0, [0.1, 0.35], "euler")
    assert torch.allclose(got, y0 + 0.25 * _nonlinear_field(0.1, y0), atol=1e-14, rtol=0)


def test_solver_order_of_convergence_on_a_nonlinear_ode():
    """Invariant: the order of the solvers. On dy/dt = -2 t y^2 (solution y = 1 / (1 / y0 + t^2),
    curved trajectories) halving the step divides the error at t = 1 by ~16 for rk4 (4th order)
    and ~2 for euler (1st); a wrong node or weight drops rk4 to order <= 3."""
    y0 = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    exact = 1 / (1 / y0 + 1.0)

    def err(n, solver):
        grid = [i / n for i in range(n + 1)]
        y = tr.integrate(lambda t, y: -2 * t * y**2, y0, grid, solver)
        return (y - exact).abs().max().item()

    ratio = err(16, "rk4") / err(32, "rk4")
    assert 13 < ratio < 20, f"rk4 error ratio {ratio:.2f} when the step halves (4th order: ~16)"
    ratio = err(64, "euler") / err(128, "euler")
    assert 1.8 < ratio < 2.2, f"euler error ratio {ratio:.2f} when the step halves (~2)"


class FirstCall(torch.nn.Module):
    """Records the first state and time the sampler evaluates; returns a zero field."""

    def __init__(self):
        super().__init__()
        self.x = self.t = None

    def forward(self, x, t, ref, ctx, delta):
        if self.x is None:
            self.x, self.t = x.clone(), t.clone()
        return torch.zeros_like(x)


def test_warm_start_point_is_the_noised_previous_latent():
    """Invariant: the ODE starts at t = s from y_s = (1 - (1 - sigma) s) eps + s z_last, z_last the
    newest latent: shifting only the newest latent by d shifts y_s by s d (same noise draws), and
    y_s - s z_last is N(0, (1 - (1 - sigma) s)^2) noise."""
    s, d = 0.5, 2.0
    g = torch.Generator().manual_seed(10)
    hist = torch.randn(64, 3, 4, 8, 8, generator=g, dtype=torch.float64)
    shifted = hist.clone()
    shifted[:, -1] += d
    starts = []
    for h in (hist, shifted):
        spy = FirstCall()
        tr.generate(spy, h, 1, 4, "euler", s, sigma=S, gen=torch.Generator().manual_seed(11))
        assert torch.allclose(spy.t, torch.full_like(spy.t, s)), spy.t
        starts.append(spy.x)
    diff = starts[1] - starts[0]
    assert torch.allclose(diff, torch.full_like(diff, s * d), atol=1e-6), (
        f"y_s moved by {diff.mean().item():.3f}, not s d = {s * d} when the previous latent moved"
    )
    noise = starts[0] - s * hist[:, -1]
    assert abs(noise.mean().item()) < 0.02
    assert noise.std().item() == pytest.approx(1 - (1 - S) * s, abs=0.02), noise.std().item()


def _time_code(t, dim):
    """sin/cos code of 200 t written out: cos of 200 t 10^(-4 i / half), then sin, i < half."""
    half = dim // 2
    rows = []
    for ti in t.tolist():
        angles = [200.0 * ti * 1e4 ** (-i / half) for i in range(half)]
        rows.append([math.cos(a) for a in angles] + [math.sin(a) for a in angles])
    return torch.tensor(rows)


def test_time_embedding_by_hand():
    """Invariant: RIVER's time code, cos half then sin half of 200 t over frequencies 10^(-4 i /
    (d / 2)): hand values at d = 4 (t = 0.01: angles 2 and 0.02) and the written-out formula."""
    got = tr.time_embedding(torch.tensor([0.0, 0.01]), 4)
    want = torch.tensor([[1.0, 1.0, 0.0, 0.0], [math.cos(2), math.cos(0.02), math.sin(2), 0.02]])
    assert torch.allclose(got, want, atol=1e-4), got
    t = torch.tensor([0.0, 0.13, 0.5, 0.97])
    assert torch.allclose(tr.time_embedding(t, 16), _time_code(t, 16), atol=1e-4)


def _tiny_field(seed=0):
    torch.manual_seed(seed)
    return tr.VectorField(channels=2, grid=3, width=16, heads=2, depth=2, mid_depth=1).eval()


def _field_inputs(seed=1, batch=3):
    g = torch.Generator().manual_seed(seed)
    x, ref, ctx = torch.randn(3, batch, 2, 3, 3, generator=g)
    t = torch.rand(batch, generator=g)
    delta = torch.randint(1, 6, (batch,), generator=g)
    return x, t, ref, ctx, delta


def test_regressor_matches_a_written_out_forward():
    """Invariant: the U-ViT regressor's wiring, written out cell by cell with its own layers: token
    = Linear([x_t, ref, ctx] of the cell) + [column, row] position + MLP(log delta); the time code
    (written out) is a token in front; output block i joins the input block output saved i-th from
    last; the time token is dropped; head Linear -> GELU -> LayerNorm -> conv 3x3."""
    m = _tiny_field()
    x, t, ref, ctx, delta = inputs = _field_inputs()
    B, C, H, W = x.shape
    with torch.no_grad():
        dist = m.dist(torch.log(delta.double()).float()[:, None])  # (B, d)
        cells = []
        for i in range(H):
            for j in range(W):
                feats = torch.cat([x[:, :, i, j], ref[:, :, i, j], ctx[:, :, i, j]], 1)
                cells.append(m.inp(feats) + torch.cat([m.cols[j], m.rows[i]]) + dist)
        h = torch.cat([_time_code(t, 16)[:, None], torch.stack(cells, 1)], 1)
        saved = []
        for block in m.down:
            h = block(h)
            saved.append(h)
        for block in m.mid:
            h = block(h)
        for i, block in enumerate(m.up):
            h = block(m.skip[i](torch.cat([h, saved[len(saved) - 1 - i]], -1)))
        lin, _, norm = m.head
        h = norm(F.gelu(lin(h[:, 1:])))
        want = m.out(h.transpose(1, 2).reshape(B, 16, H, W))
        got = m(*inputs)
    assert got.shape == x.shape
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max().item()


def test_regressor_reads_every_input():
    """Invariant: the field depends on each of x_t, t, the reference, the context and the context
    distance delta (the ablations the method relies on: changing any one changes the output)."""
    m = _tiny_field()
    inputs = _field_inputs()
    with torch.no_grad():
        base = m(*inputs)
        for k in range(5):
            changed = list(inputs)
            if k == 4:
                changed[k] = inputs[k] + 3  # delta -> delta + 3
            elif k == 1:
                changed[k] = (inputs[k] + 0.37) % 1
            else:
                changed[k] = torch.randn(
                    inputs[k].shape, generator=torch.Generator().manual_seed(k)
                )
            gap = (m(*changed) - base).abs().max().item()
            assert gap > 1e-3, f"input {('x_t', 't', 'ref', 'ctx', 'delta')[k]} ignored ({gap:.1e})"


def test_lr_schedule_against_written_out_formula(tiny):
    """Invariant: lr(step) = peak (step + 1) / warmup for step < warmup, then
    peak (1e-3 + 0.999 (1 - (step - warmup) / (total - warmup))^0.5), floored at peak / 1000
    (a plain reference at every step, warm-up boundary included); and the loop applies it: the
    tiny run's optimiser ends with lr(3) of 4 steps, warm-up 1, peak 1e-3, computed by hand."""
    for total, warmup, peak in ((40, 7, 3.0), (25, 1, 1e-3), (12, 12, 0.5)):
        for step in range(total + 4):
            if step < warmup:
                want = peak * (step + 1) / warmup
            else:
                frac = min(1.0, (step - warmup) / max(1, total - warmup))
                want = peak * (1e-3 + 0.999 * math.sqrt(1 - frac))
            got = tr.river_lr_at(step, total, peak, warmup)
            assert got == pytest.approx(want, rel=1e-9), (total, warmup, step, got, want)
    group = load(tiny[0] / "ckpt.pt")["optimizer"]["param_groups"][0]
    assert group["lr"] == pytest.approx(1e-3 * (1e-3 + 0.999 * math.sqrt(1 / 3)), rel=1e-9)
    assert group["weight_decay"] == pytest.approx(5e-6)


class ContextEcho(torch.nn.Module):
    """A field that returns the context it is given, recording every call's inputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, ref, ctx, delta):
        self.calls.append((x.clone(), t.clone(), ref.clone(), ctx.clone(), delta.clone()))
        return ctx.clone()


def test_validation_terms_by_hand():
    """Invariants of the held-out scores: loss = MSE(v, u); the ablation feeds the reference as the
    context; endpoint = (1 - sigma) x_t + (1 - (1 - sigma) t) v of the MODEL's v; copy-last =
    MSE(reference, z1). On clips moving at a constant per-clip velocity, z1 = ref + (ref - ctx) /
    delta, so every term is recomputed here from the recorded inputs of a field v = context."""
    g = torch.Generator().manual_seed(12)
    a, b = torch.randn(2, 16, 1, 2, 3, 3, generator=g)
    clips = a + b * torch.arange(6.0).view(1, 6, 1, 1, 1)
    spy, args = ContextEcho(), tr.Args(val_draws=2, seed=0, sigma_min=S)
    val = tr.validation_losses(spy, clips, args, torch.device("cpu"), contextlib.nullcontext())
    assert len(spy.calls) == 4  # per draw: the model's call, then the ablation's
    sums = torch.zeros(4, dtype=torch.float64)
    for (x_t, t, ref, ctx, delta), ablation in zip(spy.calls[::2], spy.calls[1::2]):
        assert torch.equal(ablation[3], ref) and torch.equal(ablation[0], x_t)
        tt, dd = t.view(-1, 1, 1, 1), delta.view(-1, 1, 1, 1)
        z1 = ref + (ref - ctx) / dd
        u = z1 - (1 - S) * (x_t - tt * z1) / (1 - (1 - S) * tt)
        endpoint = (1 - S) * x_t + (1 - (1 - S) * tt) * ctx
        for i, (p, q) in enumerate(((ctx, u), (ref, u), (endpoint, z1), (ref, z1))):
            sums[i] += (p - q).double().pow(2).mean()
    want = dict(
        zip(
            ["loss", "loss_context_is_reference", "endpoint_mse", "endpoint_mse_copy_last"],
            sums / 2,
        )
    )
    for k, v in want.items():
        assert val[k] == pytest.approx(v.item(), rel=1e-4), (k, val[k], v.item())
