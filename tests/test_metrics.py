"""Tests of metrics.py: reference agreement, closed forms, error paths, probe plumbing.
The probe's training is tested in test_train_probe.py."""

import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, ROOT)
import metrics as M  # noqa: E402


def _structured(c, h=48, w=40, seed=0):
    """Smooth gradients, a sharp square and a ring: SSIM on real structure, not noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([0.5 * xx + 0.3 * yy * (k + 1) / c for k in range(c)])
    img[:, h // 4 : h // 2, w // 4 : w // 2] = 0.9
    ring = ((xx - 0.6) ** 2 + (yy - 0.6) ** 2).sqrt()
    img = img + 0.5 * ((ring > 0.15) & (ring < 0.22)).float()
    return (img + 0.02 * torch.randn(img.shape, generator=g)).clamp(0, 1)


# ------------------------------------------------------------------------------- SSIM


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("kind", ["random", "structured"])
def test_ssim_matches_skimage(dtype, c, kind):
    skm = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(c)
    if kind == "random":
        a = torch.rand(c, 37, 45, generator=g)
        b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    else:
        a = _structured(c)
        b = (torch.roll(a, 2, dims=-1) * 0.9 + 0.05).clamp(0, 1)
    a, b = a.to(dtype), b.to(dtype)
    ref = skm.structural_similarity(
        a.numpy(),
        b.numpy(),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1,
        channel_axis=0,
    )
    assert 0.05 < ref < 0.99  # a non-trivial case
    assert abs(M.ssim(a, b) - ref) < 1e-5


def test_ssim_uint8_range_255_and_identity():
    skm = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8)
    b = (a.int() + torch.randint(-40, 41, a.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    ref = skm.structural_similarity(
        a.numpy(),
        b.numpy(),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
        channel_axis=0,
    )
    assert abs(M.ssim(a, b, data_range=255) - ref) < 1e-5
    assert M.ssim(a, b, data_range=255) != pytest.approx(M.ssim(a, b, data_range=1.0))
    assert M.ssim(a, a, data_range=255) == pytest.approx(1.0, abs=1e-12)


def test_ssim_small_image_error():
    with pytest.raises(ValueError, match="11x11"):
        M.ssim(torch.rand(2, 1, 10, 32), torch.rand(2, 1, 10, 32))


# -------------------------------------------------------------------- pixel metrics


def test_psnr_known_values():
    t = torch.full((4, 3, 16, 16), 0.5, dtype=torch.float64)
    assert M.psnr(t + 0.1, t) == pytest.approx(20.0, abs=1e-9)  # mse 0.01 -> 20 dB
    assert M.psnr(t * 255 + 25.5, t * 255, data_range=255) == pytest.approx(20.0, abs=1e-9)
    assert M.psnr(t, t) == pytest.approx(100.0)  # mse clamped at 1e-10
    # mean of per-frame PSNRs, not PSNR of the mean MSE
    p = t.clone()
    p[0] += 0.1
    p[1:] += 0.01
    assert M.psnr(p, t) == pytest.approx((20 + 3 * 40) / 4, abs=1e-6)


def test_per_frame_shapes_and_horizon():
    a, b = torch.rand(2, 5, 3, 16, 16), torch.rand(2, 5, 3, 16, 16)
    for fn in (M.psnr, M.ssim, M.mse, M.mae, M.mse_frame_sum, M.mae_frame_sum):
        per = fn(a, b, per_frame=True)
        assert per.shape == (2, 5) and per.dtype == torch.float64
        assert fn(a, b) == pytest.approx(float(per.mean()))
        assert fn(a[0], b[0], per_frame=True).shape == (5,)
        assert torch.allclose(fn(list(a), list(b), per_frame=True), per)  # list of videos


def test_frame_sum_is_pixel_mean_times_chw():
    a, b = torch.rand(3, 4, 2, 8, 9), torch.rand(3, 4, 2, 8, 9)
    assert torch.allclose(M.mse_frame_sum(a, b, per_frame=True), M.mse(a, b, per_frame=True) * 144)
    assert torch.allclose(M.mae_frame_sum(a, b, per_frame=True), M.mae(a, b, per_frame=True) * 144)
    assert M.mae(torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.25)) == pytest.approx(0.25)


def test_shape_mismatch_errors():
    with pytest.raises(ValueError, match=r"\(4, 3, 16, 16\).*\(4, 3, 16, 17\)"):
        M.psnr(torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 17))
    with pytest.raises(ValueError, match="share one shape"):
        M.mse([torch.rand(2, 1, 8, 8), torch.rand(3, 1, 8, 8)], torch.rand(2, 2, 1, 8, 8))
    with pytest.raises(ValueError, match="T, C, H, W"):
        M.temporal_flicker(torch.rand(8, 8))


# ------------------------------------------------------------------- Frechet distance


def test_frechet_closed_forms():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(200, 6, generator=g, dtype=torch.float64) @ torch.randn(
        6, 6, generator=g, dtype=torch.float64
    )
    assert abs(M.frechet_distance(f, f)) < 1e-8
    d = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.0], dtype=torch.float64)
    assert M.frechet_distance(f, f + d) == pytest.approx(float(d @ d), rel=1e-8)
    h = torch.randn(150, 6, generator=g, dtype=torch.float64) * 2 + 1
    assert M.frechet_distance(f, h) == pytest.approx(M.frechet_distance(h, f), rel=1e-9)
    assert M.frechet_distance(f, h) > 1.0
    # diagonal covariances: |dmu|^2 + sum (sqrt a - sqrt b)^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert M.frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want)


def test_frechet_non_commuting_2x2_closed_form():
    # for 2x2 PSD products, Tr sqrt(S1 S2) = sqrt(Tr(S1 S2) + 2 sqrt(det S1 det S2))
    s1, s2 = np.array([[2.0, 0.8], [0.8, 1.0]]), np.array([[1.0, -0.5], [-0.5, 3.0]])
    tr_sqrt = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    want = 0.25 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    got = M.frechet_distance_from_stats([0.0, 0.5], s1, [0.0, 0.0], s2)
    assert got == pytest.approx(want, rel=1e-10)


def test_frechet_rank_deficient_and_bad_input():
    f = torch.randn(10, 32, generator=torch.Generator().manual_seed(0))  # N < D
    assert abs(M.frechet_distance(f, f)) < 1e-6
    with pytest.raises(ValueError, match="N >= 2"):
        M.frechet_distance(torch.randn(1, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="D=4.*D=5"):
        M.frechet_distance(torch.randn(5, 4), torch.randn(5, 5))


# ---------------------------------------------------------- weight-free video scores


def test_temporal_flicker_and_frame_consistency():
    static = torch.rand(1, 3, 8, 8).expand(6, 3, 8, 8)
    assert M.temporal_flicker(static) == 1.0
    assert M.frame_consistency(static) == pytest.approx(1.0)
    alt = torch.zeros(6, 1, 8, 8)
    alt[1::2] = 0.2  # 0.2 * 255 = 51 grey levels between every pair of frames
    assert M.temporal_flicker(alt) == pytest.approx((255 - 51) / 255)
    ortho = torch.zeros(4, 1, 2, 2)
    ortho[0::2, 0, 0, 0] = 1
    ortho[1::2, 0, 1, 1] = 1  # orthogonal consecutive frames
    assert M.frame_consistency(ortho) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2 frames"):
        M.temporal_flicker(torch.rand(1, 3, 8, 8))


@pytest.mark.parametrize("shape,folds", [("square", 4), ("triangle", 3)])
def test_rotation_rate_reads_speed_and_direction(shape, folds):
    import toy_data

    for step in (0.1, -0.17):  # toy_data's clockwise is a growing angle: positive
        mask = toy_data._shape_masks(
            shape, np.full(10, 15.3), np.full(10, 16.6), 8.0, 0.4 + step * np.arange(10), 32, 32
        )
        yellow = torch.from_numpy(mask)[:, None] * torch.tensor([1.0, 1.0, 0.0])[:, None, None]
        assert M.rotation_rate(yellow, folds).item() == pytest.approx(step, abs=0.01)
    gen = toy_data.ToyVideoGenerator(32, 32, 12, seed=0)
    turns = [
        M.rotation_rate(gen.generate_rotating_shape(shape, "red", d)[0], folds).item()
        for d in ("clockwise", "counter-clockwise")
    ]
    assert 0.07 < turns[0] < 0.21 and -0.21 < turns[1] < -0.07  # the toy's 0.08-0.2 rad per frame
    still = toy_data.ToyVideoGenerator(32, 32, 12, seed=0).generate_moving_shape(
        shape, "blue", "top_to_bottom"
    )[0]
    assert abs(M.rotation_rate(still, folds).item()) < 0.01
    with pytest.raises(ValueError, match=">= 2 frames"):
        M.rotation_rate(torch.rand(1, 3, 8, 8), folds)


def test_measure_fps_counts_calls():
    calls = []

    def fn(x, scale=1):
        calls.append(x * scale)
        time.sleep(0.01)

    r = M.measure_fps(fn, 2, num_frames=16, warmup=2, repeats=3, scale=3)
    assert calls == [6] * 5
    assert r["s_per_call"] >= 0.009 and len(r["times_s"]) == 3
    assert r["frames_per_s"] == pytest.approx(16 / r["s_per_call"])


# --------------------------------------------------------- metrics that need weights


class _FakeI3D(torch.nn.Module):
    """Stands in for i3d_torchscript.pt: same call, features that expose what it was fed."""

    def forward(
        self,
        x: torch.Tensor,
        rescale: bool = True,
        resize: bool = True,
        return_features: bool = False,
    ) -> torch.Tensor:
        assert not rescale and not resize and return_features
        n = x.shape[0]
        size = torch.full((n,), float(x.shape[-1] * 1000 + x.shape[1] * 100 + x.shape[2]))
        return torch.stack(
            [x.mean((1, 2, 3, 4)), x.amin((1, 2, 3, 4)), x.amax((1, 2, 3, 4)), size], 1
        )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit: the I3D file is TorchScript
def test_fvd_with_a_local_torchscript_file(tmp_path):
    path = str(tmp_path / "i3d_torchscript.pt")
    torch.jit.script(_FakeI3D()).save(path)
    g = torch.Generator().manual_seed(0)
    real = torch.rand(4, 16, 1, 32, 32, generator=g)  # grey: repeated to RGB
    fake = torch.rand(4, 16, 1, 32, 32, generator=g) * 0.5

    def feats(v):
        return torch.stack(
            [
                v.mean((1, 2, 3, 4)) * 2 - 1,
                v.amin((1, 2, 3, 4)) * 2 - 1,
                v.amax((1, 2, 3, 4)) * 2 - 1,
                torch.full((4,), 224316.0),
            ],
            1,
        )

    # bilinear upsampling keeps the range and (nearly) the mean; size 224, 3 channels, 16 frames
    got = M.fvd(real, fake, path, batch_size=3)
    assert got == pytest.approx(M.frechet_distance(feats(real), feats(fake)), rel=2e-2)
    assert abs(M.fvd(real, real, path)) < 1e-9


def test_fvd_and_clip_unavailable(tmp_path):
    v = torch.rand(2, 16, 3, 32, 32)
    with pytest.raises(M.MetricUnavailable, match="cannot be downloaded"):
        M.fvd(v, v, i3d_path=str(tmp_path / "i3d_torchscript.pt"))
    with pytest.raises(M.MetricUnavailable, match="clip_score unavailable"):
        M.clip_score(v, ["a red circle"] * 2, weights=None)
    assert issubclass(M.MetricUnavailable, RuntimeError)


# ---------------------------------------------------------------------------- probe


def _fake_labels():
    return {
        "kind": list(M.PROBE_KINDS),
        "shuffled": ["real", "shuffled"],
        "type": ["moving", "rotating", "color_transition", "bouncing"],
        "shape": ["circle", "square", "triangle"],
        "color": ["red", "blue"],
        "color_to": ["red", "blue"],
        "motion": ["left_to_right", "clockwise", "bouncing", "none"],
    }


def test_probe_save_load_round_trip(tmp_path, monkeypatch):
    torch.manual_seed(0)
    probe = M.VideoProbe(_fake_labels())
    probe.accuracy = {"kind": 0.5}
    path = str(tmp_path / "probe.pt")
    M.save_probe(probe, path, steps=3)
    ck = torch.load(path, weights_only=True)
    assert ck["steps"] == 3 and ck["labels"]["color"] == ["red", "blue"]
    monkeypatch.setenv("NANOWORLD_PROBE", path)
    rng = torch.get_rng_state()
    loaded = M.load_probe()
    assert torch.equal(
        torch.get_rng_state(), rng
    )  # loading leaves a training run's random stream alone
    assert loaded.accuracy == {"kind": 0.5}
    grey = torch.rand(3, 20, 1, 48, 40)  # any size, length and channel count fits the probe
    f1, f2 = M.probe_features(grey, probe), M.probe_features(grey)
    assert f1.shape == (3, 64) and torch.allclose(f1, f2)
    assert M.probe_input(list(torch.rand(2, 7, 3, 64, 64))).shape == (2, 3, 16, 32, 32)
    assert abs(M.fd_probe(grey, grey, probe)) < 1e-6
    assert M.fd_probe(grey, grey * 0.3, probe) > 1e-4


def test_load_probe_missing_and_corrupt(tmp_path):
    with pytest.raises(M.MetricUnavailable, match="train_probe.py"):
        M.load_probe(str(tmp_path / "none.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(M.MetricUnavailable, match="not a readable probe"):
        M.load_probe(str(bad))


def test_shuffle_frames_permutes_each_video():
    x = torch.arange(2 * 16).float().view(2, 16, 1, 1, 1).expand(2, 16, 1, 2, 2)
    y = M.shuffle_frames(x, torch.Generator().manual_seed(0), dim=1)
    for i in range(2):
        assert sorted(y[i, :, 0, 0, 0].tolist()) == x[i, :, 0, 0, 0].tolist()
    assert not torch.equal(x, y)


def test_control_videos_are_black_frozen_shuffled_and_noise():
    x = torch.rand(3, 8, 3, 4, 4) * 0.5 + 0.25
    c = M.control_videos(x, torch.Generator().manual_seed(0))
    assert list(c) == list(M.CONTROLS) and all(v.shape == x.shape for v in c.values())
    assert not c["black"].any()
    assert torch.equal(c["frozen"], x[:, :1].repeat(1, 8, 1, 1, 1))
    for i in range(3):  # each video's own frames, in another order
        rows = sorted(c["shuffled"][i].flatten(1).tolist())
        assert rows == sorted(x[i].flatten(1).tolist())
    assert not torch.equal(c["shuffled"], x)
    noise = c["noise"]
    assert 0 <= noise.min() and noise.max() <= 1 and (noise < 0.25).float().mean() > 0.15


@pytest.mark.slow  # the default probe (cached, or trained here: 1-2 min) and 7 x 128 videos
def test_fd_probe_ranks_real_videos_before_their_controls_on_every_data_kind(tmp_path):
    """The check behind every fd_probe figure: `val` against `test` videos of each kind scores
    lower than `val` against black, frozen, shuffled and noise videos made from the `test` ones."""
    probe = M.default_probe_path()
    if not os.path.isfile(probe):
        probe = str(tmp_path / "probe.pt")
        cmd = [sys.executable, "train_probe.py", "--out", probe]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=1200)
    for kind, fd in M.fd_check(probe, n=64).items():
        assert fd["real"] < min(fd[c] for c in M.CONTROLS), (kind, fd)


# --------------------------------------------------------------- compute_all_metrics


def test_compute_all_metrics_none_with_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOWORLD_PROBE", str(tmp_path / "missing.pt"))
    v = torch.rand(2, 6, 3, 16, 16)
    out = M.compute_all_metrics(v)
    assert set(M.METRICS) <= set(out)
    assert 0 < out["frame_consistency"] <= 1 and 0 <= out["temporal_flicker"] <= 1
    for name in ("psnr", "ssim", "mse_frame_sum", "fd_probe", "prompt_alignment"):
        assert out[name] is None and out[name + "_unavailable"]
    out = M.compute_all_metrics(
        v, prompts=["a red circle moving from left to right"] * 2, references=(v + 0.1).clamp(0, 1)
    )
    assert out["psnr"] > 15 and len(out["psnr_per_frame"]) == 6 and len(out["ssim_per_frame"]) == 6
    assert "train_probe.py" in out["prompt_alignment_unavailable"] and out["fd_probe"] is None
    out = M.compute_all_metrics(torch.rand(2, 6, 3, 8, 8), references=torch.rand(2, 6, 3, 8, 8))
    assert out["ssim"] is None and "11x11" in out["ssim_unavailable"] and out["psnr"] is not None
    with pytest.raises(ValueError, match="does not match"):
        M.compute_all_metrics(v, references=torch.rand(2, 5, 3, 16, 16))


def test_evaluate_videos_names():
    v = torch.rand(2, 4, 1, 16, 16)
    out = M.evaluate_videos(v, None, metrics=["temporal_flicker", "mse"], references=v)
    assert out == {
        "temporal_flicker": out["temporal_flicker"],
        "mse": 0.0,
        "mse_per_frame": [0.0] * 4,
    }
    with pytest.raises(ValueError, match="unknown metric.*valid names: psnr"):
        M.evaluate_videos(v, None, metrics=["fvd"])


# ------------------------------------------------------- probe on toy data (toy_data.py)


def _rigged_probe(**answers):
    """A probe with the trained probe's heads that always answer `answers`, whatever the video."""
    from train_probe import probe_labels

    probe = M.VideoProbe(probe_labels())
    with torch.no_grad():
        for (name, labels), head in zip(probe.labels.items(), probe.heads):
            head.weight.zero_()
            head.bias.zero_()
            if name in answers:
                head.bias[labels.index(answers[name])] = 1.0
    return probe


def test_prompt_alignment_counts_named_attributes():
    pytest.importorskip("toy_data")
    probe = _rigged_probe(
        type="rotating", shape="square", color="red", color_to="red", motion="clockwise"
    )
    prompts = [
        "A blue square rotating clockwise",  # type, shape, motion right: 3/4
        "Color gradient transitioning from blue to red",
    ]  # only color_to right: 1/3
    d = M.prompt_alignment(torch.rand(2, 8, 3, 16, 16), prompts, probe, details=True)
    assert d["per_video"] == pytest.approx([0.75, 1 / 3])
    assert d["score"] == pytest.approx((0.75 + 1 / 3) / 2)
    assert d["per_attribute"] == pytest.approx(
        {"type": 0.5, "shape": 1.0, "color": 0.0, "color_to": 1.0, "motion": 1.0}
    )
    assert M.prompt_alignment(torch.rand(8, 3, 16, 16), prompts[0], probe) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="2 videos but 1 prompts"):
        M.prompt_alignment(torch.rand(2, 8, 3, 16, 16), prompts[:1], probe)
    out = M.compute_all_metrics(
        torch.rand(2, 8, 3, 16, 16),
        ["not a toy prompt"] * 2,
        references=torch.rand(2, 8, 3, 16, 16),
        probe=probe,
    )
    assert out["prompt_alignment"] is None and "parse" in out["prompt_alignment_unavailable"]
    assert out["fd_probe"] is not None and out["fd_probe"] >= -1e-9


def test_score_prediction_scores_model_and_copy_last_on_the_same_frames():
    gen = torch.Generator().manual_seed(0)
    context = torch.rand(3, 4, 1, 12, 12, generator=gen)
    target = torch.rand(3, 5, 1, 12, 12, generator=gen)
    pred = (target + 0.1 * torch.randn(target.shape, generator=gen)).clamp(0, 1)
    scores, per_frame = M.score_prediction(pred, context, target, horizon=2)
    # independent: copy-last is frame 3 of the context, repeated; MSE written out per frame
    last = context[:, 3]
    base_mse = torch.stack([((last - target[:, t]) ** 2).mean((1, 2, 3)) for t in range(5)], 1)
    model_mse = ((pred - target) ** 2).mean((2, 3, 4))
    assert torch.allclose(per_frame["copy_last"]["mse"], base_mse.double(), atol=1e-7)
    assert torch.allclose(per_frame["model"]["mse"], model_mse.double(), atol=1e-7)
    assert scores["copy_last"]["mse"] == pytest.approx(float(base_mse[:, :2].mean()), rel=1e-6)
    assert scores["copy_last"]["mse_rollout"] == pytest.approx(float(base_mse.mean()), rel=1e-6)
    assert scores["model"]["mse_per_frame"] == pytest.approx(model_mse.mean(0).tolist(), rel=1e-6)
    psnr_0 = float((10 * torch.log10(1 / model_mse[:, 0])).mean())
    assert scores["model"]["psnr_per_frame"][0] == pytest.approx(psnr_0, rel=1e-6)
    assert scores["model"]["mse_frame_sum"] == pytest.approx(float(model_mse[:, :2].mean()) * 144)
    assert set(scores["model"]) == set(scores["copy_last"])
    everything, _ = M.score_prediction(pred, context, target)  # no horizon: all frames, no _rollout
    assert everything["model"]["mse"] == pytest.approx(float(model_mse.mean()), rel=1e-6)
    assert "mse_rollout" not in everything["model"]


# ------------------------------------------------- the method against independent references


def test_pixel_scores_per_frame_against_numpy_loops():
    """mse / mae (mean over C, H, W), mse_frame_sum / mae_frame_sum (sum over C, H, W) and PSNR
    10 log10(L^2 / mse) per frame, written as plain numpy loops; the scalar is the mean of the
    per-frame values (not the PSNR of the mean error)."""
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 2, (2, 3, 2, 5, 6))
    t = rng.uniform(0, 2, (2, 3, 2, 5, 6))
    p[1, 2] = t[1, 2] + 0.001  # frames of very different error: mean of PSNRs != PSNR of mean
    want = {k: np.zeros((2, 3)) for k in ("mse", "mae", "mse_sum", "mae_sum", "psnr")}
    for b in range(2):
        for f in range(3):
            d = p[b, f] - t[b, f]
            sq, ab = 0.0, 0.0
            for v in d.ravel():
                sq += v * v
                ab += abs(v)
            want["mse"][b, f], want["mae"][b, f] = sq / d.size, ab / d.size
            want["mse_sum"][b, f], want["mae_sum"][b, f] = sq, ab
            want["psnr"][b, f] = 10 * math.log10(2.0**2 / (sq / d.size))
    pt, tt = torch.from_numpy(p), torch.from_numpy(t)
    got = {
        "mse": M.mse(pt, tt, per_frame=True),
        "mae": M.mae(pt, tt, per_frame=True),
        "mse_sum": M.mse_frame_sum(pt, tt, per_frame=True),
        "mae_sum": M.mae_frame_sum(pt, tt, per_frame=True),
        "psnr": M.psnr(pt, tt, data_range=2.0, per_frame=True),
    }
    for k, w in want.items():
        assert np.allclose(got[k].numpy(), w, rtol=1e-12), k
    assert M.psnr(pt, tt, data_range=2.0) == pytest.approx(want["psnr"].mean(), rel=1e-12)
    assert M.mae_frame_sum(tt, pt) == pytest.approx(want["mae_sum"].mean(), rel=1e-12)
    assert M.mse(pt, tt) == pytest.approx(want["mse"].mean(), rel=1e-12)


def _ssim_reference(x, y, data_range):
    """Wang et al. 2004 written out: every 11x11 window fully inside the image, Gaussian weights
    (sigma 1.5) normalised to 1, population (weighted) statistics; mean over the map, then over
    the channels of a (C, H, W) frame."""
    r = np.arange(-5, 6)
    g = np.exp(-(r**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    per_channel = []
    for a, b in zip(x, y):
        vals = []
        for i in range(a.shape[0] - 10):
            for j in range(a.shape[1] - 10):
                pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                num = (2 * ma * mb + c1) * (2 * cov + c2)
                vals.append(num / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
        per_channel.append(np.mean(vals))
    return float(np.mean(per_channel))


def test_ssim_per_frame_against_a_written_out_reference_and_skimage():
    """ssim(per_frame=True) on a (B, T, C, H, W) batch, in chunks smaller than the batch: each
    frame's value is the written-out SSIM above (and skimage's, an independent library) of that
    frame; constant frames a, b give the closed form (2ab + C1) / (a^2 + b^2 + C1). The
    written-out reference runs without scikit-image; skimage is checked where installed."""
    try:
        import skimage.metrics as skm
    except ImportError:  # scikit-image is optional: the written-out reference still pins ssim
        skm = None
    g = torch.Generator().manual_seed(3)
    a = torch.rand(2, 2, 3, 13, 14, generator=g, dtype=torch.float64) * 4
    b = (a + torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 4)
    b[0, 1] = a[0, 1].roll(1, -1)  # frames of very different similarity
    per = M.ssim(a, b, data_range=4.0, per_frame=True, chunk=4)
    assert per.shape == (2, 2)
    for i in range(2):
        for t in range(2):
            x, y = a[i, t].numpy(), b[i, t].numpy()
            want = _ssim_reference(x, y, 4.0)
            assert float(per[i, t]) == pytest.approx(want, abs=1e-10)
            if skm is None:
                continue
            lib = skm.structural_similarity(
                x,
                y,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=4.0,
                channel_axis=0,
            )
            assert lib == pytest.approx(want, abs=1e-10)  # the reference is skimage's SSIM
    assert float(per.std()) > 0.05
    c1 = 0.01**2
    flat = M.ssim(torch.full((1, 12, 12), 0.2), torch.full((1, 12, 12), 0.7))
    assert flat == pytest.approx((2 * 0.2 * 0.7 + c1) / (0.2**2 + 0.7**2 + c1), rel=1e-6)


def _ssim_openstl_reference(x, y):
    """The published tables' SSIM written out: every 7x7 window fully inside the frame, plain
    means, sample (n - 1) variances and covariance, C1 = (0.01 * 2)^2 and C2 = (0.03 * 2)^2 (float
    frames were taken as spanning [-1, 1]); mean over the map, then over the channels."""
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    per_channel = []
    for a, b in zip(x, y):
        vals = []
        for i in range(a.shape[0] - 6):
            for j in range(a.shape[1] - 6):
                pa, pb = a[i : i + 7, j : j + 7].ravel(), b[i : i + 7, j : j + 7].ravel()
                ma, mb = pa.mean(), pb.mean()
                va = ((pa - ma) ** 2).sum() / 48
                vb = ((pb - mb) ** 2).sum() / 48
                cov = ((pa - ma) * (pb - mb)).sum() / 48
                num = (2 * ma * mb + c1) * (2 * cov + c2)
                vals.append(num / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
        per_channel.append(np.mean(vals))
    return float(np.mean(per_channel))


def test_ssim_openstl_against_a_written_out_reference_and_skimage():
    """ssim_openstl is the convention of the published Moving MNIST tables (OpenSTL's metric():
    skimage's structural_similarity with the defaults of scikit-image <= 0.19, float frames taken
    as [-1, 1]): the written-out reference above and, where installed, today's skimage called with
    data_range=2 and its default 7x7 uniform window with sample covariance."""
    try:
        import skimage.metrics as skm
    except ImportError:
        skm = None
    g = torch.Generator().manual_seed(4)
    a = torch.rand(2, 2, 3, 12, 10, generator=g, dtype=torch.float64)
    b = (a + 0.3 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    b[1, 0] = a[1, 0].roll(2, -2)
    per = M.ssim_openstl(a, b, per_frame=True, chunk=4)
    assert per.shape == (2, 2) and float(per.std()) > 0.05
    for i in range(2):
        for t in range(2):
            x, y = a[i, t].numpy(), b[i, t].numpy()
            want = _ssim_openstl_reference(x, y)
            assert float(per[i, t]) == pytest.approx(want, abs=1e-10)
            if skm is not None:
                lib = skm.structural_similarity(x, y, data_range=2.0, channel_axis=0)
                assert lib == pytest.approx(want, abs=1e-10)
    with pytest.raises(ValueError, match="7x7"):
        M.ssim_openstl(torch.rand(1, 6, 9), torch.rand(1, 6, 9))


def _moving_digits(n=6, t=8):
    """Grey clips of a bright square gliding over a dark frame, (n, t, 1, 32, 32)."""
    v = torch.zeros(n, t, 1, 32, 32)
    for i in range(n):
        for f in range(t):
            x = 2 + (i + 2 * f) % 20
            v[i, f, 0, 8 + i : 18 + i, x : x + 8] = 1.0
    return v


def test_prediction_scores_rank_a_good_prediction_above_degenerate_ones():
    """On clips of a moving square, a slightly blurred copy of the truth scores better than black
    frames, frozen frames (the last context frame), the truth shuffled in time and uniform noise,
    on every score metrics.json reports (errors lower, PSNR and both SSIMs higher)."""
    clips = _moving_digits()
    context, target = clips[:, :4], clips[:, 4:]
    gen = torch.Generator().manual_seed(0)
    blur = F.avg_pool2d(target.flatten(0, 1), 3, 1, 1).view(target.shape)
    good = 0.8 * target + 0.2 * blur
    bad = {
        "black": torch.zeros_like(target),
        "frozen": M.copy_last(context, 4),
        "shuffled": target[:, [3, 0, 1, 2]],
        "noise": torch.rand(target.shape, generator=gen),
    }
    ours = M.prediction_scores(good, target)[0]
    for name, video in bad.items():
        theirs = M.prediction_scores(video, target)[0]
        for k in ("mse", "mse_frame_sum", "mae_frame_sum"):
            assert ours[k] < theirs[k], (name, k)
        for k in ("psnr", "ssim", "ssim_openstl"):
            assert ours[k] > theirs[k], (name, k)
    # the published tables' SSIM reads higher than Wang's on the same frames
    assert M.ssim_openstl(bad["frozen"], target) > M.ssim(bad["frozen"], target)


def test_prediction_scores_in_chunks_of_clips():
    """Clips scored two at a time: every clip's per-frame error is still its own (numpy loop)."""
    rng = np.random.default_rng(1)
    pred, target = rng.uniform(0, 1, (2, 5, 3, 1, 11, 11))
    per = M.prediction_scores(torch.from_numpy(pred), torch.from_numpy(target), chunk=2)[1]
    for n in range(5):
        for t in range(3):
            want = sum(float(v) ** 2 for v in (pred[n, t] - target[n, t]).ravel())
            assert float(per["mse_frame_sum"][n, t]) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="4 clips, target 5"):
        M.prediction_scores(torch.from_numpy(pred[:4]), torch.from_numpy(target))


def test_prediction_scores_errors_unclamped_psnr_and_ssim_clamped():
    """As the published tables: MSE and MAE (sums per frame) on the raw output, PSNR and SSIM on
    the output clamped to [0, 1] (hand case: a frame of 1.5 against a frame of half 0.5, half 1)."""
    target = torch.ones(1, 1, 1, 12, 12)
    target[..., :6, :] = 0.5
    pred = torch.full((1, 1, 1, 12, 12), 1.5)
    s = M.prediction_scores(pred, target)[0]
    assert s["mse_frame_sum"] == pytest.approx(72 * 1.0 + 72 * 0.25)
    assert s["mae_frame_sum"] == pytest.approx(72 * 1.0 + 72 * 0.5)
    assert s["psnr"] == pytest.approx(10 * math.log10(1 / (72 * 0.25 / 144)))
    ones = torch.ones_like(pred)
    assert s["ssim"] == pytest.approx(M.ssim(ones, target))
    assert s["ssim_openstl"] == pytest.approx(M.ssim_openstl(ones, target))


def test_frechet_distance_of_features_with_known_gaussian_statistics():
    """frechet_distance fits mean and UNBIASED covariance to the features and returns
    ||mu1 - mu2||^2 + sum (s1 + s2 - 2 sqrt(s1 s2)) for diagonal covariances: 1-D features
    {0, 2} (mean 1, variance 2) vs {3, 5, 7} (mean 5, variance 4); 2-D features at the corners
    of a rectangle (covariance diagonal, 4 a^2 / 3 and 4 b^2 / 3)."""
    d1 = M.frechet_distance(torch.tensor([[0.0], [2.0]]), torch.tensor([[3.0], [5.0], [7.0]]))
    assert d1 == pytest.approx(16 + 2 + 4 - 2 * math.sqrt(2 * 4), rel=1e-10)

    def corners(mx, my, a, b):
        return torch.tensor(
            [[mx + a, my + b], [mx + a, my - b], [mx - a, my + b], [mx - a, my - b]],
            dtype=torch.float64,
        )

    fa, fb = corners(1.0, -2.0, 3.0, 1.0), corners(-1.0, 0.5, 1.0, 2.0)
    sa, sb = [4 * 9 / 3, 4 * 1 / 3], [4 * 1 / 3, 4 * 4 / 3]
    want = (2.0**2 + 2.5**2) + sum(x + y - 2 * math.sqrt(x * y) for x, y in zip(sa, sb))
    assert M.frechet_distance(fa, fb) == pytest.approx(want, rel=1e-10)
    assert M.frechet_distance(fb, fa) == pytest.approx(want, rel=1e-10)


class _ColourProbe(M.VideoProbe):
    """A probe whose colour head answers the brightest channel of each video (red, green, blue)
    and whose other heads give fixed answers: what prompt_alignment reads back per video."""

    def features(self, x):
        return x.mean((2, 3, 4))

    def classify(self, f):
        n = len(f)
        out = {k: torch.zeros(n, len(v)) for k, v in self.labels.items()}
        out["color"][:, :3] = torch.nn.functional.one_hot(f.argmax(1), 3).float()
        for head, answer in (("type", "moving"), ("shape", "square"), ("motion", "clockwise")):
            out[head][:, self.labels[head].index(answer)] = 1.0
        out["color_to"][:, self.labels["color_to"].index("blue")] = 1.0
        return out


def test_prompt_alignment_reads_each_video_by_hand():
    """prompt_alignment: per video, the fraction of the attributes its prompt names (None
    ignored) that the probe reads back from THAT video; the score is the mean over videos, and
    per attribute the mean over the videos that name it."""
    from train_probe import probe_labels

    probe = _ColourProbe(probe_labels())
    videos = torch.zeros(3, 4, 3, 16, 16)
    videos[0, :, 0] = 1  # red
    videos[1, :, 2] = 1  # blue
    videos[2, :, 1] = 1  # green
    prompts = [
        "A red square moving from left to right",  # type, shape, color right, motion wrong: 3/4
        "A red triangle rotating clockwise",  # color, type, shape wrong; motion right: 1/4
        "Color gradient transitioning from green to blue",  # type wrong, color, color_to: 2/3
    ]
    d = M.prompt_alignment(videos, prompts, probe, details=True)
    assert d["per_video"] == pytest.approx([3 / 4, 1 / 4, 2 / 3])
    assert d["score"] == pytest.approx((3 / 4 + 1 / 4 + 2 / 3) / 3)
    assert d["per_attribute"] == pytest.approx(
        {"type": 1 / 3, "shape": 1 / 2, "color": 2 / 3, "color_to": 1.0, "motion": 1 / 2}
    )


def _square_video(angles, cx, cy, half, size=32, sub=4):
    """A white square of half-side `half` centred at (cx, cy) (pixel centres at integers, y down)
    turned by angles[t] (growing angle: clockwise on screen), antialiased by sub x sub
    supersampling: (T, 3, size, size)."""
    offs = (np.arange(sub) + 0.5) / sub - 0.5
    ys = (np.arange(size)[:, None] + offs[None]).ravel()
    xs = ys.copy()
    X, Y = np.meshgrid(xs, ys)
    frames = []
    for a in angles:
        u = (X - cx) * math.cos(a) + (Y - cy) * math.sin(a)  # rotate back by a
        v = -(X - cx) * math.sin(a) + (Y - cy) * math.cos(a)
        inside = ((np.abs(u) <= half) & (np.abs(v) <= half)).astype(np.float64)
        frames.append(inside.reshape(size, sub, size, sub).mean((1, 3)))
    f = torch.from_numpy(np.stack(frames))
    return f[:, None].expand(-1, 3, -1, -1).clone()


def test_rotation_rate_of_a_hand_drawn_square():
    """rotation_rate: radians per frame of a square drawn here, turning by a known step about an
    off-centre point, clockwise on screen positive; across the +-pi/4 ambiguity of its 4-fold
    moment, per video of a batch; a still square reads 0."""
    n = 12
    cases = [  # first angle, step, centre x, centre y, half side
        (0.4, 0.12, 13.3, 17.8, 6.5),
        (0.7, -0.2, 18.6, 14.2, 6.5),
        (-0.3, 0.05, 15.0, 15.5, 6.5),
        (0.2, 0.15, 8.6, 22.4, 5.0),  # far from the image centre
    ]
    videos = torch.stack(
        [_square_video(a0 + s * np.arange(n), cx, cy, h) for a0, s, cx, cy, h in cases]
    )
    got = M.rotation_rate(videos, 4)
    assert got.shape == (4,)
    assert got.tolist() == pytest.approx([c[1] for c in cases], abs=2e-3)
    still = _square_video(np.full(n, 0.3), 11.2, 19.7, 5.0)
    assert abs(float(M.rotation_rate(still, 4))) < 1e-6
    # a faint ground of noise, as generated videos have, leaves the reading as it was
    noisy = videos + 0.1 * torch.rand(videos.shape, generator=torch.Generator().manual_seed(0))
    assert M.rotation_rate(noisy, 4).tolist() == pytest.approx([c[1] for c in cases], abs=5e-3)


def test_fd_probe_windows_slides_over_both_videos_in_step():
    torch.manual_seed(0)
    probe = M.VideoProbe(_fake_labels())
    real = torch.rand(6, 10, 3, 16, 16)
    fake = real * 0.3
    fake[:, 4:] = real[:, 4:]  # the same from frame 4 on
    got = M.fd_probe_windows(real, fake, 4, 3, probe)
    want = [M.fd_probe(real[:, s : s + 4], fake[:, s : s + 4], probe) for s in (0, 3, 6)]
    assert got == pytest.approx(want) and len(got) == 3  # starts 0, 3, 6: the last ends at 10
    assert got[0] > 1e-4 and abs(got[2]) < 1e-6  # a window that differs, one that does not
    with pytest.raises(ValueError, match="one length"):
        M.fd_probe_windows(real, fake[:, :9], 4, 3, probe)
    with pytest.raises(ValueError, match="window"):
        M.fd_probe_windows(real, fake, 12, 3, probe)
