"""train_river.py: flow-matching path, ODE solvers, frame-index invariants, constant cost, learning, frozen first stage,
CLI and outputs, determinism, resume, eval-only, bench, DDP, bad input."""

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tyro

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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    assert m["val"]["loss"] > 0 and m["val"]["loss_context_is_reference"] > 0
    assert m["val"]["endpoint_mse_copy_last"] > 0
    assert m["perf"]["nfe_per_frame"] == 4 * (3 - 1) and m["perf"]["gen_s_per_frame"] > 0
    assert m["perf"]["train_samples_per_s"] > 0 and m["perf"]["mfu"] is None  # no peak known on CPU
    assert m["sampler"] == {"solver": "rk4", "ode_steps": 3, "warm_start": 0.0, "past_horizon": 5}
    assert m["data"]["kind"] == "smoke" and m["data"]["n_eval"] == 3 and m["data"]["horizon"] == 3
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
    assert ma["eval"]["psnr_per_frame"] == mb["eval"]["psnr_per_frame"] and ma["val"] == mb["val"]


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
    assert b["eval"] == a["eval"] and b["baselines"] == a["baselines"] and b["val"] == a["val"]
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
        out.index("warning: no probe at") < out.index("eval step")
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


def test_torchrun_two_cpu_processes(first_stage, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
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
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
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
