"""Video metrics for nanoworld: pixel scores, Frechet distances, prompt alignment, speed.

Videos are float tensors in [0, 1]: one video (T, C, H, W), a batch (B, T, C, H, W), or a
list of equal-shape (T, C, H, W) videos. Per-frame scores (`per_frame=True`) keep the
leading dims, so `psnr(pred, true, per_frame=True).mean(0)` is a PSNR-vs-horizon curve.

    import metrics
    metrics.psnr(pred, true)                     # mean of per-frame PSNRs, dB
    metrics.ssim(pred, true, per_frame=True)     # (B, T) float64, Wang et al. 2004 SSIM
    metrics.mse_frame_sum(pred, true)            # Moving MNIST convention (sum over pixels)
    metrics.ssim_openstl(pred, true)             # SSIM as the published Moving MNIST tables
    metrics.compute_all_metrics(fake, prompts, references=real)   # dict for metrics.json
    metrics.evaluate_videos(fake, prompts, metrics=["prompt_alignment", "temporal_flicker"])
    metrics.measure_fps(sample, model, num_frames=16)              # frames/s of a generator

Metrics that need weights: `fvd` needs a local I3D TorchScript file and `clip_score` needs
open_clip plus local weights; neither can be downloaded here, so without them they raise
MetricUnavailable. The weight-free stand-ins are named for what they are:
`fd_probe` (Frechet distance on features of a small 3D-CNN probe trained in-repo on toy
videos; NOT comparable to FVD numbers) and `prompt_alignment` (fraction of the prompt's
attributes the probe recovers; the toy-data counterpart of a CLIP score).

    python train_probe.py          # trains and caches the probe (~1 min on CPU; see its --help)
    python metrics.py fd-check     # fd_probe: real vs real, black, frozen, shuffled, noise
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed here (missing weights or optional package)."""


# ----------------------------------------------------------------------------- inputs


def _tensor(x, name: str) -> torch.Tensor:
    """Tensor from a tensor, numpy array or list of equal-shape videos (stacked)."""
    if isinstance(x, (list, tuple)):
        if len(x) == 0:
            raise ValueError(f"{name} is an empty list; pass at least one video")
        items = [_tensor(v, name) for v in x]
        shapes = sorted({tuple(v.shape) for v in items})
        if len(shapes) > 1:
            raise ValueError(
                f"{name}: videos in a list must share one shape, got {shapes}; "
                "resize or crop them first"
            )
        return torch.stack(items)
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not torch.is_tensor(x):
        raise ValueError(
            f"{name} must be a tensor, array or list of videos, got {type(x).__name__}"
        )
    return x.detach().cpu()


def _videos(x, name: str = "videos") -> torch.Tensor:
    """(B, T, C, H, W) float32 in [0, 1]; uint8 input is scaled by 1/255."""
    v = _tensor(x, name)
    if v.ndim == 4:
        v = v.unsqueeze(0)
    if v.ndim != 5:
        raise ValueError(
            f"{name} must be (T, C, H, W) or (B, T, C, H, W), got shape {tuple(v.shape)}"
        )
    return v.float() / 255 if v.dtype == torch.uint8 else v.float()


def _to_rgb(v: torch.Tensor) -> torch.Tensor:
    """(B, T, C, H, W) with C in (1, 3) -> 3 channels (grey repeated)."""
    if v.shape[2] not in (1, 3):
        raise ValueError(f"videos need 1 or 3 channels, got shape {tuple(v.shape)}")
    return v.expand(-1, -1, 3, -1, -1) if v.shape[2] == 1 else v


def _pair(pred, target) -> tuple[torch.Tensor, torch.Tensor]:
    """Both inputs as float64 tensors of one shape (..., C, H, W)."""
    a, b = _tensor(pred, "pred"), _tensor(target, "target")
    if a.shape != b.shape:
        raise ValueError(
            f"pred shape {tuple(a.shape)} does not match target shape "
            f"{tuple(b.shape)}; pass videos of the same (T, C, H, W)"
        )
    if a.ndim < 3:
        raise ValueError(f"expected frames (..., C, H, W), got shape {tuple(a.shape)}")
    return a.double(), b.double()


def _reduce(per: torch.Tensor, per_frame: bool):
    return per if per_frame else float(per.mean())


# ------------------------------------------------------------------ per-frame pixel scores


def _err(pred, target, power: int) -> torch.Tensor:
    a, b = _pair(pred, target)
    return (a - b).abs().pow(power)


def mse(pred, target, per_frame: bool = False):
    """Per-pixel mean squared error of each frame (mean over C, H, W)."""
    return _reduce(_err(pred, target, 2).mean((-3, -2, -1)), per_frame)


def mae(pred, target, per_frame: bool = False):
    """Per-pixel mean absolute error of each frame (mean over C, H, W)."""
    return _reduce(_err(pred, target, 1).mean((-3, -2, -1)), per_frame)


def mse_frame_sum(pred, target, per_frame: bool = False):
    """Squared error summed over C, H, W per frame: the Moving MNIST / OpenSTL 'MSE'."""
    return _reduce(_err(pred, target, 2).sum((-3, -2, -1)), per_frame)


def mae_frame_sum(pred, target, per_frame: bool = False):
    """Absolute error summed over C, H, W per frame: the Moving MNIST / OpenSTL 'MAE'."""
    return _reduce(_err(pred, target, 1).sum((-3, -2, -1)), per_frame)


def psnr(pred, target, data_range: float = 1.0, per_frame: bool = False):
    """PSNR in dB per frame, 10 log10(L^2 / mse); the scalar is the mean of per-frame PSNRs.

    mse is clamped at 1e-10 (so identical frames give 100 dB at L = 1, not infinity).
    Clamp model outputs to [0, 1] before scoring, as OpenSTL and PredRNN do.
    """
    err = _err(pred, target, 2).mean((-3, -2, -1)).clamp_min(1e-10)
    return _reduce(10 * torch.log10(data_range**2 / err), per_frame)


def _gaussian_1d(sigma: float = 1.5, radius: int = 5) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _valid_filter(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """z (..., H, W) correlated with the separable kernel g (k,) along both axes, valid region
    only, as products with banded matrices: 10x faster than float64 convolutions on a CPU."""

    def band(n):  # band[i + j, i] = g[j]
        m = torch.zeros(n, n - len(g) + 1, dtype=g.dtype)
        for j in range(len(g)):
            m.diagonal(-j).fill_(g[j])
        return m

    return band(z.shape[-2]).T @ z @ band(z.shape[-1])


def ssim(pred, target, data_range: float = 1.0, per_frame: bool = False, chunk: int = 512):
    """SSIM of Wang et al. 2004 per frame: 11x11 Gaussian (sigma 1.5), K1 0.01, K2 0.03.

    Population variances, valid (unpadded) convolution in float64, mean over the map and
    the channels. Equals skimage's structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=L, channel_axis=0) on each (C, H, W) frame:
    skimage filters with padding and then crops 5 px per side, which is exactly the valid
    region. data_range must be given explicitly by the caller's convention (1 for [0, 1]).
    """
    a, b = _pair(pred, target)
    lead, (c, h, w) = a.shape[:-3], a.shape[-3:]
    if h < 11 or w < 11:
        raise ValueError(f"ssim needs frames of at least 11x11 pixels, got {h}x{w}")
    x, y = a.reshape(-1, 1, h, w), b.reshape(-1, 1, h, w)
    g = _gaussian_1d()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = []
    for i in range(0, x.shape[0], chunk):  # chunks keep float64 maps of big batches in memory
        xi, yi = x[i : i + chunk], y[i : i + chunk]
        z = torch.cat([xi, yi, xi * xi, yi * yi, xi * yi], 1)
        mx, my, mxx, myy, mxy = _valid_filter(z, g).unbind(1)
        vx, vy, cxy = mxx - mx * mx, myy - my * my, mxy - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        out.append(s.mean((-2, -1)))
    per = torch.cat(out).reshape(*lead, c).mean(-1)
    return _reduce(per, per_frame)


def ssim_openstl(pred, target, per_frame: bool = False, chunk: int = 512):
    """SSIM as the published Moving MNIST tables compute it: OpenSTL's metric() calls skimage's
    structural_similarity on float frames with the defaults of scikit-image <= 0.19, which took
    float input to span [-1, 1]. So: a 7x7 uniform window, sample covariance (x 49/48), data range
    2 (K1 0.01 and K2 0.03 give C1 = 0.02^2 and C2 = 0.06^2, 4x ssim's), the valid region of the
    map, its mean, then the mean over channels. Equals skimage's structural_similarity(p, t,
    data_range=2.0, channel_axis=0) with its default window on each (C, H, W) frame. On the same
    predictions it reads higher than ssim (Wang et al.): compare it only with those tables. Clamp
    predictions to [0, 1] first, as they do.
    """
    a, b = _pair(pred, target)
    lead, (c, h, w) = a.shape[:-3], a.shape[-3:]
    if h < 7 or w < 7:
        raise ValueError(f"ssim_openstl needs frames of at least 7x7 pixels, got {h}x{w}")
    frames = a.reshape(-1, 1, h, w), b.reshape(-1, 1, h, w)
    box = torch.full((7,), 1 / 7, dtype=torch.float64)
    k1, k2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2  # data range 2
    scores = []
    for i in range(0, len(frames[0]), chunk):
        p, t = (f[i : i + chunk] for f in frames)
        # 7x7 window means of p, t, p^2, t^2 and p t over the valid region
        m = _valid_filter(torch.cat([p, t, p * p, t * t, p * t], 1), box)
        mu_p, mu_t = m[:, 0], m[:, 1]
        var_p = (m[:, 2] - mu_p**2) * 49 / 48  # sample variances and covariance
        var_t = (m[:, 3] - mu_t**2) * 49 / 48
        cov = (m[:, 4] - mu_p * mu_t) * 49 / 48
        num = (2 * mu_p * mu_t + k1) * (2 * cov + k2)
        den = (mu_p**2 + mu_t**2 + k1) * (var_p + var_t + k2)
        scores.append((num / den).mean((-2, -1)))
    return _reduce(torch.cat(scores).reshape(*lead, c).mean(-1), per_frame)


# ------------------------------------------------------------------- Frechet distances


PREDICTION_SCORES = {
    "psnr": psnr,
    "ssim": ssim,
    "ssim_openstl": ssim_openstl,
    "mse": mse,
    "mse_frame_sum": mse_frame_sum,
    "mae_frame_sum": mae_frame_sum,
}
# as in the published Moving MNIST tables: errors on the raw output, the rest on it clamped
UNCLAMPED_SCORES = ("mse", "mse_frame_sum", "mae_frame_sum")


def prediction_scores(pred, target, horizon=None, chunk: int = 256) -> tuple[dict, dict]:
    """Per-frame scores of predicted frames against the truth (N, T, C, H, W) in [0, 1]: the
    errors (UNCLAMPED_SCORES) on pred as given, PSNR and SSIM on pred clamped to [0, 1]. Clips
    are scored `chunk` at a time: float64 copies of 10,000 Moving MNIST clips would take GBs.

    -> (summary, per_frame). summary: for each of PREDICTION_SCORES its mean over the first
    `horizon` frames (all frames if None), `<name>_per_frame` (the mean over clips of each frame)
    and, with a horizon, `<name>_rollout` (the mean over all frames); per_frame: the (N, T)
    float64 tensors, for plots.
    """
    pred, target = _tensor(pred, "pred"), _tensor(target, "target")
    if pred.shape != target.shape:
        _pair(pred[:1], target[:1])  # one line naming both shapes
        raise ValueError(f"pred has {len(pred)} clips, target {len(target)}; pass one per clip")
    summary, per_frame = {}, {}
    for name, score in PREDICTION_SCORES.items():
        parts = []
        for i in range(0, len(pred), chunk):
            p = pred[i : i + chunk]
            p = p if name in UNCLAMPED_SCORES else p.clamp(0, 1)
            parts.append(score(p, target[i : i + chunk], per_frame=True))
        per = torch.cat(parts).double()
        per_frame[name] = per
        summary[name] = float(per[:, :horizon].mean())
        if horizon is not None:
            summary[f"{name}_rollout"] = float(per.mean())
        summary[f"{name}_per_frame"] = per.mean(0).tolist()
    return summary, per_frame


def copy_last(context, n_frames) -> torch.Tensor:
    """The copy-last baseline: the last observed frame of each clip, repeated n_frames times."""
    return context[:, -1:].expand(-1, n_frames, *context.shape[2:])


def score_prediction(pred, context, target, horizon=None) -> tuple[dict, dict]:
    """A prediction and the copy-last baseline scored on exactly the same frames.

    context (N, Tc, ...) observed frames, pred and target (N, T, ...) the frames after them.
    -> ({"model": summary, "copy_last": summary}, {"model": per_frame, "copy_last": per_frame})
    with prediction_scores' summaries and per-frame tensors.
    """
    ours, ours_per_frame = prediction_scores(pred, target, horizon)
    base, base_per_frame = prediction_scores(copy_last(context, target.shape[1]), target, horizon)
    return {"model": ours, "copy_last": base}, {
        "model": ours_per_frame,
        "copy_last": base_per_frame,
    }


def _numerical_zero(eigenvalues):
    """Eigenvalues below the rounding noise of a symmetric eigensolver set to 0 (as
    np.linalg.matrix_rank's tolerance): the square root would turn noise of 1e-16 into 1e-8
    per eigenvalue, and a rank-deficient covariance (N < D) has many of them."""
    tol = max(eigenvalues.max(initial=0.0), 0.0) * len(eigenvalues) * np.finfo(np.float64).eps
    return np.where(eigenvalues > tol, eigenvalues, 0.0)


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

    Tr((S1 S2)^(1/2)) is the sum of square roots of the eigenvalues of the symmetric PSD
    matrix sqrt(S1) S2 sqrt(S1), which has the same spectrum as S1 S2. Working with the
    symmetric form keeps the eigenvalues real, so no complex sqrtm and no scipy.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"inconsistent statistics: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {s1.shape} vs {s2.shape}"
        )
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(_numerical_zero(w))) @ v.T
    m = root1 @ s2 @ root1
    tr_sqrt = np.sqrt(_numerical_zero(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def _stats(feats, name: str):
    f = _tensor(feats, name).double().numpy()
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"{name} must be (N, D) features with N >= 2, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to (N, D) features (unbiased covariance).

    Biased and N-dependent like FID/FVD: compare only numbers computed at equal N.
    """
    mu1, s1 = _stats(feats_a, "feats_a")
    mu2, s2 = _stats(feats_b, "feats_b")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dims differ: feats_a D={mu1.size}, feats_b D={mu2.size}")
    return frechet_distance_from_stats(mu1, s1, mu2, s2)


def fvd(real, fake, i3d_path, batch_size: int = 8, device: str = "cpu") -> float:
    """Frechet Video Distance with the Kinetics-400 I3D TorchScript file of StyleGAN-V.

    The file (`i3d_torchscript.pt`) is a TF-Hub-matching I3D that takes (N, 3, T, 224, 224)
    in [-1, 1]. We resize frames to 224x224 (bilinear) and map [0, 1] -> [-1, 1] ourselves,
    then call it with rescale=False, resize=False, return_features=True (400-d features).
    Use 16-frame clips and equal N for real and fake; 64x64 toy video is far outside I3D's
    training domain, so prefer fd_probe for toy data.
    """
    if not i3d_path or not os.path.isfile(str(i3d_path)):
        raise MetricUnavailable(
            f"fvd unavailable: I3D TorchScript file {i3d_path!r} not found; it "
            "cannot be downloaded here, pass a local path to i3d_torchscript.pt"
        )
    i3d = torch.jit.load(str(i3d_path), map_location=device).eval()

    def feats(videos, name):
        v, out = _videos(videos, name), []
        for i in range(0, len(v), batch_size):
            x = _to_rgb(v[i : i + batch_size])
            b, t = x.shape[:2]
            x = F.interpolate(
                x.flatten(0, 1), size=(224, 224), mode="bilinear", align_corners=False
            )
            x = (x.view(b, t, 3, 224, 224).transpose(1, 2) * 2 - 1).to(device)
            with torch.no_grad():
                out.append(i3d(x, rescale=False, resize=False, return_features=True).cpu())
        return torch.cat(out)

    return frechet_distance(feats(real, "real"), feats(fake, "fake"))


# --------------------------------------------------------------- weight-free video scores


def frame_consistency(videos) -> float:
    """Pixel-space frame consistency: mean cosine similarity of consecutive frames.

    The weight-free proxy of CLIP frame consistency (Tune-A-Video, Gen-1), which uses CLIP
    image embeddings instead of pixels; the two scales are not comparable.
    """
    v = _videos(videos)
    if v.shape[1] < 2:
        raise ValueError(f"frame_consistency needs at least 2 frames, got shape {tuple(v.shape)}")
    f = v.flatten(2).double()
    return float(F.cosine_similarity(f[:, 1:], f[:, :-1], dim=-1, eps=1e-8).mean())


def temporal_flicker(videos) -> float:
    """VBench temporal flickering: (255 - mean |frame_t+1 - frame_t| on 0-255) / 255.

    Frames are quantised to uint8 first, as VBench reads decoded video; 1 means static.
    """
    v = _videos(videos)
    if v.shape[1] < 2:
        raise ValueError(f"temporal_flicker needs at least 2 frames, got shape {tuple(v.shape)}")
    q = (v.clamp(0, 1) * 255).round().double()
    return float((255 - (q[:, 1:] - q[:, :-1]).abs().mean()) / 255)


def rotation_rate(videos, folds: int) -> torch.Tensor:
    """How fast one bright shape on a dark ground turns: radians per frame, clockwise on screen
    > 0; (B,).

    The k-fold moment sum I (z - centroid)^k, z = x + iy, has angle k times the orientation of a
    shape with k-fold symmetry (4: square, 3: triangle); its frame-to-frame change, wrapped to
    +-pi/k, is averaged. It reads the rotation direction of toy shapes, where the probe is
    weakest; a disc or a still shape reads ~0. Only pixels brighter than half the frame's
    brightest count: |z|^k weighs a faint speckle at the border above the shape (a generated
    square on a ground of faint noise read 0 rad/frame while it turned 0.13).
    """
    v = _to_rgb(_videos(videos)).double().mean(2)  # brightness weights, (B, T, H, W)
    if v.shape[1] < 2 or folds < 2:
        raise ValueError(
            "rotation_rate needs >= 2 frames and folds >= 2, "
            f"got shape {tuple(v.shape)}, folds {folds}"
        )
    v = v * (v > 0.5 * v.amax((-1, -2), keepdim=True))  # the shape, not the ground
    ys, xs = torch.meshgrid(
        *(torch.arange(n, dtype=torch.float64) for n in v.shape[-2:]), indexing="ij"
    )
    mass = v.sum((-1, -2), keepdim=True).clamp_min(1e-12)
    z = torch.complex(
        xs - (v * xs).sum((-1, -2), keepdim=True) / mass,
        ys - (v * ys).sum((-1, -2), keepdim=True) / mass,
    )
    angle = torch.angle((v * z**folds).sum((-1, -2))) / folds
    half = math.pi / folds
    return (torch.remainder(angle.diff(dim=1) + half, 2 * half) - half).mean(1)


def measure_fps(fn, *args, num_frames: int, warmup: int = 1, repeats: int = 3, **kwargs) -> dict:
    """Time fn(*args, **kwargs) that produces num_frames frames per call.

    Warm-up calls (compile, caches) are excluded; CUDA is synchronised around each call only
    if it is already initialised, so this never creates a CUDA context. s_per_call is the
    median, robust to a noisy shared machine.
    """

    def sync():
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn(*args, **kwargs)
    sync()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        sync()
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    return {
        "frames_per_s": num_frames / med,
        "s_per_call": med,
        "s_per_call_min": min(times),
        "times_s": times,
        "num_frames": num_frames,
        "warmup": warmup,
        "repeats": len(times),
    }


def clip_score(videos, prompts, weights=None, model_name: str = "ViT-B-32") -> float:
    """CLIPSIM: mean over frames of 100 * max(cos(image, text), 0) with open_clip.

    Needs open_clip installed and a local weights file (no downloads here).
    """
    try:
        import open_clip
    except ImportError:
        raise MetricUnavailable(
            "clip_score unavailable: open_clip is not installed "
            "(pip install open_clip_torch) and needs local weights"
        ) from None
    if not weights or not os.path.isfile(str(weights)):
        raise MetricUnavailable(
            f"clip_score unavailable: CLIP weights {weights!r} not found; they "
            "cannot be downloaded here, pass weights=/path/to/open_clip.pt"
        )
    model = open_clip.create_model(model_name, pretrained=str(weights)).eval()
    tok = open_clip.get_tokenizer(model_name)
    v, prompts = _to_rgb(_videos(videos)), [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(v):
        raise ValueError(
            f"got {len(v)} videos but {len(prompts)} prompts; pass one prompt per video"
        )
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    scores = []
    with torch.no_grad():
        for video, prompt in zip(v, prompts):
            x = F.interpolate(video, size=(224, 224), mode="bicubic", align_corners=False)
            img = F.normalize(model.encode_image((x.clamp(0, 1) - mean) / std), dim=-1)
            txt = F.normalize(model.encode_text(tok([prompt])), dim=-1)
            scores.append(100 * (img @ txt.T).clamp_min(0).mean())
    return float(torch.stack(scores).mean())


# ---------------------------------------------------------------------------- the probe
# A small 3D CNN trained in-repo on toy videos (train_probe.py). Its pooled features stand in
# for I3D's in fd_probe, and its attribute heads read prompts back from videos for
# prompt_alignment. Here: the network (to rebuild a probe from its checkpoint, as FVD needs
# I3D), its input, its checkpoint format and the toy videos it is trained and checked on.

PROBE_KINDS = (
    "shapes",
    "bouncing_balls",
    "pendulum",
    "falling",
    "projectile",
    "moving_mnist",
    "smoke",
)
PROBE_FRAMES, PROBE_SIZE, PROBE_FORMAT = 16, 32, "nanoworld-probe-v1"
ATTRS = ("type", "shape", "color", "color_to", "motion")  # the attrs a prompt can name
METRICS = (
    "psnr",
    "ssim",
    "mse",
    "mae",
    "mse_frame_sum",
    "mae_frame_sum",
    "frame_consistency",
    "temporal_flicker",
    "prompt_alignment",
    "fd_probe",
)
_PROBES: dict = {}  # (path, mtime) -> loaded probe, so repeated metric calls load once


def default_probe_path() -> str:
    """$NANOWORLD_PROBE, else ~/.cache/nanoworld/probe.pt."""
    return os.environ.get("NANOWORLD_PROBE") or os.path.join(
        os.path.expanduser("~"), ".cache", "nanoworld", "probe.pt"
    )


def probe_input(videos) -> torch.Tensor:
    """Any videos -> (B, 3, 16, 32, 32): 16 frames picked evenly in time, bilinear resize
    (antialiased), grey repeated to RGB. So every video size and length fits the probe."""
    v = _to_rgb(_videos(videos)).clamp(0, 1)
    b, t, _, h, w = v.shape
    x = v[:, torch.linspace(0, t - 1, PROBE_FRAMES).round().long()].flatten(0, 1)
    if (h, w) != (PROBE_SIZE, PROBE_SIZE):
        x = F.interpolate(
            x, size=(PROBE_SIZE, PROBE_SIZE), mode="bilinear", antialias=True, align_corners=False
        )
    return x.view(b, PROBE_FRAMES, 3, PROBE_SIZE, PROBE_SIZE).transpose(1, 2).contiguous()


class VideoProbe(nn.Module):
    """Four Conv3d blocks -> global mean pool (the features) -> one linear head per label set."""

    def __init__(self, labels: dict, widths=(16, 32, 48, 64)):
        super().__init__()
        layers, cin = [], 3
        for i, w in enumerate(widths):
            # the first block keeps every frame: motion lives in frame-to-frame changes
            layers += [
                nn.Conv3d(cin, w, 3, (1, 2, 2) if i == 0 else 2, 1),
                nn.BatchNorm3d(w),
                nn.SiLU(),
            ]
            cin = w
        # BatchNorm, not GroupNorm: per-clip normalisation erased the colours the heads must read.
        # Metrics always run the probe in eval mode, so features never depend on the batch.
        self.body = nn.Sequential(*layers)
        # a list, not a ModuleDict: a head named "type" would clash with Module.type
        self.heads = nn.ModuleList([nn.Linear(cin, len(v)) for v in labels.values()])
        self.labels, self.widths = {k: list(v) for k, v in labels.items()}, list(widths)

    def classify(self, f: torch.Tensor) -> dict:
        return {k: head(f) for k, head in zip(self.labels, self.heads)}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean((2, 3, 4))

    def forward(self, x: torch.Tensor) -> dict:
        return self.classify(self.features(x))


def shuffle_frames(x: torch.Tensor, gen: torch.Generator, dim: int = 1) -> torch.Tensor:
    """Permute the frames (axis dim) of each video independently: the corruption fd_check
    measures and the probe's 'shuffled' head is trained on."""
    perm = torch.rand(x.shape[0], x.shape[dim], generator=gen).argsort(1)
    shape = [x.shape[0]] + [1] * (x.ndim - 1)
    shape[dim] = x.shape[dim]
    return x.gather(dim, perm.view(shape).expand_as(x))


CONTROLS = ("black", "frozen", "shuffled", "noise")


def control_videos(videos: torch.Tensor, gen: torch.Generator) -> dict:
    """The videos a score of real ones must rank below them, made from real videos (B, T, C, H,
    W) in [0, 1]: black, frozen (the first frame repeated), shuffled in time, uniform noise."""
    return {
        "black": torch.zeros_like(videos),
        "frozen": videos[:, :1].expand_as(videos),
        "shuffled": shuffle_frames(videos, gen),
        "noise": torch.rand(videos.shape, generator=gen),
    }


def toy_probe_videos(kind: str, n: int, split: str, seed: int, chunk: int = 64):
    """n toy videos of a kind as probe input (uint8, saves 4x memory) and their attrs."""
    import toy_data as td

    ds = td.make_dataset(kind, n, resolution=64, num_frames=PROBE_FRAMES, seed=seed, split=split)
    xs, attrs = [], []
    for i in range(0, n, chunk):
        items = [ds[j] for j in range(i, min(n, i + chunk))]
        xs.append((probe_input([it["video"] for it in items]) * 255).round().to(torch.uint8))
        attrs += [it.get("attrs") for it in items]
    return torch.cat(xs), attrs


def save_probe(probe: VideoProbe, path: str, **info) -> None:
    """Plain tensors, lists and numbers only, so torch.load(weights_only=True) reads it."""
    ckpt = {
        "format": PROBE_FORMAT,
        "labels": probe.labels,
        "widths": probe.widths,
        "state_dict": {k: v.detach().clone() for k, v in probe.state_dict().items()},
        "accuracy": dict(getattr(probe, "accuracy", {})),
        **info,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash never leaves half a probe behind


def load_probe(path: str | None = None) -> VideoProbe:
    """Load (once per file version) the probe from path, $NANOWORLD_PROBE or the cache."""
    path = os.path.abspath(os.path.expanduser(path or default_probe_path()))
    if not os.path.isfile(path):
        raise MetricUnavailable(
            f"no probe at {path}; run `python train_probe.py` "
            "(about a minute on CPU) or set NANOWORLD_PROBE"
        )
    key = (path, os.path.getmtime(path))
    if key not in _PROBES:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            assert isinstance(ckpt, dict) and ckpt.get("format") == PROBE_FORMAT
            with torch.random.fork_rng(
                devices=[]
            ):  # a metric must not move the caller's (training) random stream
                probe = VideoProbe(ckpt["labels"], ckpt["widths"])
            probe.load_state_dict(ckpt["state_dict"])
        except Exception as e:
            raise MetricUnavailable(
                f"{path} is not a readable probe checkpoint ({type(e).__name__}); "
                "run `python train_probe.py` to rebuild it"
            ) from None
        probe.accuracy = ckpt.get("accuracy", {})
        _PROBES.clear()
        _PROBES[key] = probe.eval()
    return _PROBES[key]


def _get_probe(probe) -> VideoProbe:
    return probe.eval() if isinstance(probe, VideoProbe) else load_probe(probe)


@torch.no_grad()
def _probe_outputs(videos, probe, batch_size: int = 64) -> tuple[torch.Tensor, dict]:
    v, feats, logits = _videos(videos), [], []
    for i in range(0, len(v), batch_size):
        f = probe.features(probe_input(v[i : i + batch_size]))
        feats.append(f)
        logits.append(probe.classify(f))
    return torch.cat(feats), {k: torch.cat([d[k] for d in logits]) for k in probe.labels}


def probe_features(videos, probe=None) -> torch.Tensor:
    """(N, D) penultimate (pooled) probe features; probe: a VideoProbe (put in eval mode),
    a checkpoint path, or None for the cached probe."""
    return _probe_outputs(videos, _get_probe(probe))[0]


def fd_probe(real, fake, probe=None) -> float:
    """Frechet distance on probe features: a toy-data FVD-style score, NOT FVD."""
    p = _get_probe(probe)
    return frechet_distance(probe_features(real, p), probe_features(fake, p))


def fd_probe_windows(real, fake, window: int, stride: int, probe=None) -> list:
    """fd_probe of every `window` frames starting each `stride` frames (0, stride, ... while the
    window fits), fake against real videos of the same length at the same place in time: how
    quality changes along a long video. Motion counts (the probe sees frame order), so a still,
    shuffled, dark or noisy stretch scores badly where a frame-by-frame distance would not."""
    real, fake = _videos(real, "real"), _videos(fake, "fake")
    t = real.shape[1]
    if fake.shape[1] != t or not 2 <= window <= t or stride < 1:
        raise ValueError(
            f"fd_probe_windows needs real and fake of one length >= window >= 2 and stride >= 1, "
            f"got {t} and {fake.shape[1]} frames, window {window}, stride {stride}"
        )
    p = _get_probe(probe)
    starts = range(0, t - window + 1, stride)
    return [fd_probe(real[:, s : s + window], fake[:, s : s + window], p) for s in starts]


def prompt_alignment(videos, prompts, probe=None, details: bool = False):
    """Fraction of the attributes a prompt names (type, shape, colour(s), motion; parsed with
    toy_data.parse_prompt, None ignored) that the probe reads back from the video, averaged
    over videos. details=True returns {"score", "per_attribute", "per_video"}."""
    p = _get_probe(probe)  # first, so a missing probe is reported before anything else
    import toy_data as td

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    v = _videos(videos)
    if len(prompts) != len(v):
        raise ValueError(
            f"got {len(v)} videos but {len(prompts)} prompts; pass one prompt per video"
        )
    logits = _probe_outputs(v, p)[1]
    hits, per_video = {a: [] for a in ATTRS}, []
    for i, prompt in enumerate(prompts):
        attrs, ok = td.parse_prompt(prompt), []
        for a in ATTRS:
            if attrs.get(a) is not None:
                ok.append(p.labels[a][int(logits[a][i].argmax())] == attrs[a])
                hits[a].append(ok[-1])
        per_video.append(sum(ok) / len(ok))
    score = float(np.mean(per_video))  # parse_prompt always names at least type and colour
    if not details:
        return score
    return {
        "score": score,
        "per_video": per_video,
        "per_attribute": {a: sum(h) / len(h) for a, h in hits.items() if h},
    }


# ------------------------------------------------------------------------ all together

_PIXEL = {
    "psnr": psnr,
    "ssim": ssim,
    "mse": mse,
    "mae": mae,
    "mse_frame_sum": mse_frame_sum,
    "mae_frame_sum": mae_frame_sum,
}


def evaluate_videos(videos, prompts=None, metrics=METRICS, references=None, probe=None) -> dict:
    """The named metrics of videos (against references for pixel scores and fd_probe).

    Pixel metrics also give "<name>_per_frame" (mean over videos, one value per frame).
    What cannot be computed is None, with the reason under "<name>_unavailable".
    """
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; valid names: {', '.join(METRICS)}")
    v = _videos(videos)
    ref = None if references is None else _videos(references, "references")
    if prompts is not None:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(v):
            raise ValueError(
                f"got {len(v)} videos but {len(prompts)} prompts; pass one prompt per video"
            )
    out = {}
    for name in names:
        reason = _why_missing(name, v, ref, prompts)
        try:
            if reason:
                raise MetricUnavailable(reason)
            if name in _PIXEL:  # a shape mismatch here is the caller's bug: it raises
                per = _PIXEL[name](v, ref, per_frame=True)
                out[name], out[name + "_per_frame"] = float(per.mean()), per.mean(0).tolist()
            elif name in ("frame_consistency", "temporal_flicker"):
                out[name] = (
                    frame_consistency if name == "frame_consistency" else temporal_flicker
                )(v)
            elif name == "fd_probe":
                out[name] = fd_probe(ref, v, probe)
            else:
                try:
                    d = prompt_alignment(v, prompts, probe, details=True)
                except ValueError as e:  # a prompt toy_data cannot parse
                    raise MetricUnavailable(str(e)) from None
                out[name], out[name + "_per_attribute"] = d["score"], d["per_attribute"]
        except MetricUnavailable as e:
            out[name], out[name + "_unavailable"] = None, str(e)
            if name in _PIXEL:
                out[name + "_per_frame"] = None
    return out


def _why_missing(name: str, v: torch.Tensor, ref, prompts) -> str | None:
    if ref is None and (name in _PIXEL or name == "fd_probe"):
        return "needs references (real videos; of the same shape for pixel metrics)"
    if name == "ssim" and min(v.shape[-2:]) < 11:
        return f"frames of {tuple(v.shape[-2:])} are smaller than SSIM's 11x11 window"
    if name in ("frame_consistency", "temporal_flicker") and v.shape[1] < 2:
        return "needs videos of at least 2 frames"
    if name == "prompt_alignment" and prompts is None:
        return "needs prompts"
    if name == "fd_probe" and min(len(v), len(ref)) < 2:
        return "needs at least 2 videos in each set"
    return None


def compute_all_metrics(videos, prompts=None, references=None, probe=None) -> dict:
    """Every metric in METRICS that the inputs allow; see evaluate_videos."""
    return evaluate_videos(videos, prompts, METRICS, references, probe)


# -------------------------------------------------------------------------------- CLI


def fd_check(probe=None, n: int = 64, seed: int = 0, kinds=PROBE_KINDS) -> dict:
    """fd_probe of n `val` videos of each data kind against n `test` ones ("real") and against
    the controls of those (control_videos): a score worth reporting ranks real videos first.
    -> {kind: {"real": fd, "black": fd, ...}}"""
    p, gen, res = _get_probe(probe), torch.Generator().manual_seed(seed), {}
    for kind in kinds:
        # probe inputs are (B, 3, 16, 32, 32) uint8: back to (B, T, C, H, W) videos in [0, 1]
        a, b = (
            toy_probe_videos(kind, n, split, seed)[0].transpose(1, 2).float() / 255
            for split in ("val", "test")
        )
        fa = probe_features(a, p)
        res[kind] = {"real": frechet_distance(fa, probe_features(b, p))}
        for name, v in control_videos(b, gen).items():
            res[kind][name] = frechet_distance(fa, probe_features(v, p))
        scores = "  ".join(f"{k} {v:7.2f}" for k, v in res[kind].items())
        print(f"{kind:15s} N={n}  fd_probe against {scores}", flush=True)
    return res


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(
        description="nanoworld metrics: check fd_probe (the probe itself: train_probe.py)"
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    fc = sub.add_parser(
        "fd-check", help="fd_probe of real videos against real, black, frozen, shuffled, noise"
    )
    fc.add_argument("--probe", help="probe path (default: the cached probe)")
    fc.add_argument("--n", type=int, default=64, help="videos per set and data kind")
    args = ap.parse_args(argv)
    # the probe is small: one thread is nearly as fast and never oversubscribes a busy machine
    torch.set_num_threads(1)
    try:
        fd_check(args.probe, n=args.n)
    except MetricUnavailable as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
