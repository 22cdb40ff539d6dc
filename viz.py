"""Looking at videos: GIF/MP4 files, captioned grids, side-by-side comparisons,
training curves, metric-vs-horizon plots, latent pictures and TensorBoard GIFs.

Videos are float (T, C, H, W) in [0, 1] (C = 1 or 3), or batches (B, T, C, H, W),
torch or numpy (uint8 arrays are read as 0..255). Grid and comparison writers also return
the uint8 (N, H, W, 3) frames they drew. matplotlib, imageio and tensorboard are imported
only inside the functions that need them.

    import viz
    viz.create_video_gif(video, "samples/one.gif", fps=8)
    viz.save_mp4(video, "samples/one.mp4")
    viz.save_video_grid(batch, "samples/grid.gif", prompts=prompts)   # .png: rows of frames
    viz.create_video_comparison({"truth": gt, "prediction": pred}, "samples/cmp.gif",
                                context_frames=4)                    # adds an |error| panel
    viz.plot_training_curves("runs/train_river", "runs/train_river/plots/curves.png")
    viz.plot_metric_vs_horizon({"river": psnr_bt, "copy_last": base_bt},  # (B, T) -> mean +- std
                               "plots/psnr.png", metric="PSNR", context=4, train_horizon=12)
    viz.save_latent_picture(z, "samples/latent.png")                 # PCA of channels to RGB
    viz.log_video(writer, "samples/pred", batch, step, fps=8)        # animated GIF in TensorBoard
"""

import io
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BG = (24, 24, 24)
FG = (235, 235, 235)
CONTEXT_COLOR = (70, 140, 255)  # blue/orange: the pair colour-blind readers still tell apart
PREDICTED_COLOR = (255, 150, 0)
GAP = 4


# ---------------------------------------------------------------- input checks
def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x)
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def _video(x, name="video") -> np.ndarray:
    v = _np(x)
    if v.ndim != 4 or v.shape[1] not in (1, 3) or not v.shape[0]:
        raise ValueError(
            f"{name} must be (T, C, H, W) with C in (1, 3) in [0, 1], got shape {tuple(v.shape)}"
        )
    return v


def _videos(x, name="videos") -> list:
    """A single video, a batch or a list of videos -> list of (T, C, H, W) arrays."""
    v = x if isinstance(x, (list, tuple)) else _np(x)
    if isinstance(v, np.ndarray) and v.ndim != 5:
        return [_video(v, name)]
    if not len(v):
        raise ValueError(f"{name} is empty: pass at least one (T, C, H, W) video")
    return [_video(u, f"{name}[{i}]") for i, u in enumerate(v)]


def _out_path(path, allowed) -> Path:
    p = Path(path)
    if p.suffix.lower() not in allowed:
        raise ValueError(f"{p}: unknown extension '{p.suffix}', use one of {', '.join(allowed)}")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


# ---------------------------------------------------------------- pixels
def to_uint8(video) -> np.ndarray:
    """(..., C, H, W) float in [0, 1] -> (..., H, W, C) uint8 via round(clip(x) * 255)."""
    x = _np(video)
    if x.ndim not in (3, 4, 5) or x.shape[-3] not in (1, 3):
        raise ValueError(
            "to_uint8 wants channels-first (C|T,C|B,T,C, H, W) with C in (1, 3), "
            f"got {tuple(x.shape)}"
        )
    x = np.nan_to_num(x, nan=0.0)
    return np.moveaxis(np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8), -3, -1)


def _rgb(v: np.ndarray, scale=1) -> np.ndarray:
    """(T, C, H, W) float -> (T, H*s, W*s, 3) uint8, nearest upscaling."""
    u = to_uint8(v)
    u = np.repeat(u, 3, axis=-1) if u.shape[-1] == 1 else u
    return u.repeat(scale, axis=-3).repeat(scale, axis=-2) if scale > 1 else u


def _auto_scale(h, w, target) -> int:
    # Tiny frames (32x32) get a nearest-neighbour blow-up so captions fit under them.
    return max(1, math.ceil(target / max(h, w)))


def _full(n, h, w, color=BG) -> np.ndarray:
    return np.broadcast_to(np.array(color, np.uint8), (n, h, w, 3)).copy()


def _stack(blocks, axis, gap=GAP) -> np.ndarray:
    """Concatenate (N, h, w, 3) blocks along axis 1 (down) or 2 (across), padding top-left with
    BG."""
    n = max(b.shape[0] for b in blocks)
    other = 2 if axis == 1 else 1
    size = max(b.shape[other] for b in blocks)
    out = []
    for i, b in enumerate(blocks):
        shape = [n, size, size]
        shape[axis] = b.shape[axis]
        padded = _full(n, shape[1], shape[2])
        padded[:, : b.shape[1], : b.shape[2]] = b  # broadcasts static (1, h, w, 3) strips over time
        if i and gap:
            out.append(_full(n, *((gap, size) if axis == 1 else (size, gap))))
        out.append(padded)
    return np.concatenate(out, axis=axis)


def _margin(x, m=GAP) -> np.ndarray:
    return np.pad(x, ((0, 0), (m, m), (m, m), (0, 0)), constant_values=BG[0])  # BG is a grey


def _pad_time(u, n, hold=True) -> np.ndarray:
    if len(u) >= n:
        return u
    fill = np.repeat(u[-1:], n - len(u), 0) if hold else _full(n - len(u), *u.shape[1:3])
    return np.concatenate([u, fill])


# ---------------------------------------------------------------- text
@lru_cache(maxsize=8)
def _font(size=12):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError, ImportError):
        try:
            import matplotlib

            return ImageFont.truetype(
                str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"), size
            )
        except (ImportError, OSError):
            return ImageFont.load_default()


def _line_height(font) -> int:
    return font.getbbox("Ag")[3] + 3


def _wrap(text, width, font, max_lines=4) -> list:
    """Greedy word wrap to a pixel width; over-long words are cut, extra lines end in '...'."""
    lines, cur = [], ""
    for word in str(text).split():
        while font.getlength(word) > width and len(word) > 1:  # a word wider than the cell
            cut = max(1, int(len(word) * width / font.getlength(word)))
            lines, cur, word = lines + ([cur] if cur else []) + [word[:cut]], "", word[cut:]
        trial = f"{cur} {word}".strip()
        if cur and font.getlength(trial) > width:
            lines, cur = lines + [cur], word
        else:
            cur = trial
    lines += [cur] if cur else []
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [lines[max_lines - 1].rstrip() + "..."]
    return lines


def _text(lines, width, height=None, color=FG, align="center") -> np.ndarray:
    """Render lines of text into a (1, height, width, 3) BG strip, vertically centred."""
    font = _font()
    lh = _line_height(font)
    height = height or lh * max(1, len(lines)) + 2
    img = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(img)
    y = (height - lh * len(lines)) // 2 + 1
    for line in lines:
        x = (width - font.getlength(line)) / 2 if align == "center" else 3
        draw.text((x, y), line, font=font, fill=color)
        y += lh
    return np.asarray(img)[None]


# ---------------------------------------------------------------- files
def _write_gif(frames, fp, fps):
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    imgs = [Image.fromarray(f) for f in frames]
    # Pillow merges identical consecutive frames (summing their durations), so a still
    # stretch of video comes back with fewer, longer frames; the timing stays right.
    imgs[0].save(
        fp,
        format="GIF",
        save_all=True,
        append_images=imgs[1:],
        duration=max(20, round(1000 / fps)),
        loop=0,
    )


def _frames_of(video_or_batch) -> np.ndarray:
    vids = _videos(video_or_batch)
    return _rgb(vids[0]) if len(vids) == 1 else _grid_frames(vids, None, None, 1)


def create_video_gif(video, path, fps=8) -> Path:
    """Looping animated GIF of one video (a batch becomes an uncaptioned grid)."""
    p = _out_path(path, (".gif",))
    _write_gif(_frames_of(video), p, fps)
    return p


def save_mp4(video, path, fps=8) -> Path:
    """H.264 MP4 through imageio-ffmpeg; odd frame sizes are padded to even (yuv420p needs it)."""
    p = _out_path(path, (".mp4",))
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as e:
        raise ImportError(
            f"save_mp4 needs imageio and ffmpeg: pip install imageio imageio-ffmpeg ({e})"
        ) from None
    f = _frames_of(video)
    f = np.pad(f, ((0, 0), (0, f.shape[1] % 2), (0, f.shape[2] % 2), (0, 0)), mode="edge")
    with imageio.get_writer(
        p, fps=fps, codec="libx264", quality=8, macro_block_size=1, ffmpeg_log_level="error"
    ) as w:
        for frame in f:
            w.append_data(frame)
    return p


# ---------------------------------------------------------------- grids
def _grid_frames(vids, prompts, ncols, scale) -> np.ndarray:
    if len({v.shape[2:] for v in vids}) > 1:
        raise ValueError(
            f"grid videos must share H and W, got {sorted({v.shape[2:] for v in vids})}"
        )
    us = [_rgb(v, scale) for v in vids]
    n_t, w = max(len(u) for u in us), us[0].shape[2]
    cells = [_pad_time(u, n_t) for u in us]
    if prompts is not None:
        wrapped = [_wrap(t, w - 4, _font()) for t in prompts]
        n_lines = max(1, max(len(x) for x in wrapped))
        cells = [
            _stack([c, _text(x, w, _line_height(_font()) * n_lines + 2)], 1, 0)
            for c, x in zip(cells, wrapped)
        ]
    ncols = ncols or math.ceil(math.sqrt(len(cells)))
    cells += [_full(*cells[0].shape[:3])] * (
        -len(cells) % ncols
    )  # blank cells square off the last row
    rows = [_stack(cells[i : i + ncols], 2) for i in range(0, len(cells), ncols)]
    return _margin(_stack(rows, 1))


def _strip_rows(vids, prompts, scale) -> np.ndarray:
    """Still picture: one row of frames per video, its caption above the row."""
    blocks = []
    for i, v in enumerate(vids):
        row = _stack(list(_rgb(v, scale)[:, None]), 2, 2)
        if prompts is not None:
            row = _stack(
                [_text(_wrap(prompts[i], row.shape[2] - 8, _font()), row.shape[2]), row], 1, 0
            )
        blocks.append(row)
    return _margin(_stack(blocks, 1, 2 * GAP))


def save_video_grid(videos, path, prompts=None, fps=8, ncols=None, scale=None) -> np.ndarray:
    """.gif: animated grid with a wrapped caption under each video; .png: one row of frames
    per video with its caption. Returns the uint8 (N, H, W, 3) picture(s) written."""
    p = _out_path(path, (".gif", ".png"))
    vids = _videos(videos)
    h, w = vids[0].shape[2:]
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if prompts is not None and len(prompts) != len(vids):
        raise ValueError(
            f"got {len(prompts)} prompts for {len(vids)} videos: pass one prompt per video"
        )
    if p.suffix.lower() == ".png":
        frames = _strip_rows(vids, prompts, scale or _auto_scale(h, w, 64))
        Image.fromarray(frames[0]).save(p)
    else:
        frames = _grid_frames(vids, prompts, ncols, scale or _auto_scale(h, w, 96))
        _write_gif(frames, p, fps)
    return frames


# ---------------------------------------------------------------- comparisons
def _error_pair(labels):
    low = [str(x).lower() for x in labels]
    t = next((i for i, x in enumerate(low) if x in ("truth", "target", "gt", "ground truth")), None)
    q = next((i for i, x in enumerate(low) if x.startswith("pred")), None)
    return (t, q) if t is not None and q is not None else ((0, 1) if len(labels) == 2 else None)


def _panels(videos, labels, error, gain):
    """-> labels, list of (B, T, C, H, W) float arrays (|error| panel appended)."""
    if isinstance(videos, dict):
        labels, videos = list(videos), list(videos.values())
    if not isinstance(videos, (list, tuple)) or not videos:
        raise ValueError("videos must be a non-empty dict label -> video or list of videos")
    arrs = [_np(v) for v in videos]
    arrs = [a[None] if a.ndim == 4 else a for a in arrs]
    for i, a in enumerate(arrs):
        if a.ndim != 5 or a.shape[2] not in (1, 3):
            raise ValueError(
                f"panel {i} must be (T, C, H, W) or (B, T, C, H, W), C in (1, 3), "
                f"got {tuple(a.shape)}"
            )
    if len({a.shape[0] for a in arrs}) > 1 or len({a.shape[3:] for a in arrs}) > 1:
        raise ValueError(
            f"panels must share batch size and H, W, got shapes {[tuple(a.shape) for a in arrs]}"
        )
    if labels is None:
        labels = (
            ["truth", "prediction"]
            if len(arrs) == 2
            else [f"video {i + 1}" for i in range(len(arrs))]
        )
    labels = [str(x) for x in labels]
    if len(labels) != len(arrs):
        raise ValueError(f"got {len(labels)} labels for {len(arrs)} videos")
    pair = _error_pair(labels) if error else None
    if pair:
        a, b = (np.repeat(arrs[i], 3 // arrs[i].shape[2], axis=2) for i in pair)
        n = min(a.shape[1], b.shape[1])
        arrs.append(np.clip(np.abs(a[:, :n] - b[:, :n]).mean(2, keepdims=True) * gain, 0, 1))
        labels.append(f"|error| x{gain:g}")
    return labels, arrs


def _bordered(u, context, border) -> np.ndarray:
    """(T, h, w, 3) -> frames framed in the context or predicted colour by index."""
    if border <= 0:
        return u
    out = _full(len(u), u.shape[1] + 2 * border, u.shape[2] + 2 * border)
    if context is not None:
        out[:context], out[context:] = CONTEXT_COLOR, PREDICTED_COLOR
    out[:, border:-border, border:-border] = u
    return out


def _status(t, context):
    if context is None:
        return "", FG
    return ("context", CONTEXT_COLOR) if t < context else ("predicted", PREDICTED_COLOR)


def create_video_comparison(
    videos,
    path,
    labels=None,
    context_frames=None,
    fps=4,
    error=True,
    error_gain=4.0,
    scale=None,
    border=3,
) -> np.ndarray:
    """Side-by-side panels (dict label -> video, or a list with `labels`). A truth/prediction
    pair (or exactly two videos) gets an amplified |error| panel. Frames before
    `context_frames` are framed in CONTEXT_COLOR, later ones in PREDICTED_COLOR.
    Shorter videos are padded with blank frames. .gif: panels side by side, animated;
    .png: a strip, one row per panel (per sample for batches), one column per frame.
    Returns the uint8 (N, H, W, 3) picture(s) written."""
    p = _out_path(path, (".gif", ".png"))
    labels, arrs = _panels(videos, labels, error, error_gain)
    n_t = max(a.shape[1] for a in arrs)
    h, w = arrs[0].shape[3:]
    s = scale or _auto_scale(h, w, 64 if p.suffix.lower() == ".png" else 96)
    # [panel][sample] -> (n_t, h, w, 3) framed frames; padding frames stay unframed
    fr = [
        [_pad_time(_bordered(_rgb(v, s), context_frames, border), n_t, hold=False) for v in a]
        for a in arrs
    ]
    pw, ph = fr[0][0].shape[2], fr[0][0].shape[1]
    if p.suffix.lower() == ".gif":
        cols = [
            _stack([_text(_wrap(lab, pw - 4, _font(), 2), pw)] + col, 1)
            for lab, col in zip(labels, fr)
        ]
        body = _stack(cols, 2)
        status = [_status(t, context_frames) for t in range(n_t)]
        head = np.concatenate(
            [
                _text([f"frame {t + 1}/{n_t}  {word}"], body.shape[2], color=c)
                for t, (word, c) in enumerate(status)
            ]
        )
        frames = _margin(_stack([head, body], 1))
        _write_gif(frames, p, fps)
        return frames
    lw = max(int(_font().getlength(str(lab))) for lab in labels) + 10
    nums = [_text([str(t + 1)], pw, color=_status(t, context_frames)[1]) for t in range(n_t)]
    rows = [_stack([_full(1, 1, lw)] + nums, 2, 2)]
    for b in range(arrs[0].shape[0]):
        rows += [_full(1, 2 * GAP, 1)] if b else []  # extra space between samples of a batch
        for lab, f in zip(labels, fr):
            rows.append(
                _stack([_text([str(lab)], lw, ph, align="left")] + list(f[b][:, None]), 2, 2)
            )
    frames = _margin(_stack(rows, 1, 2))
    Image.fromarray(frames[0]).save(p)
    return frames


# ---------------------------------------------------------------- plots
def _smooth(values, weight) -> np.ndarray:
    """TensorBoard-style debiased exponential moving average."""
    out, acc = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        out[i] = acc / (1 - weight ** (i + 1))
    return out


def _read_events(run_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = Path(run_dir)
    dirs = sorted({f.parent for f in root.rglob("events.out.tfevents.*")}) if root.is_dir() else []
    if not dirs:
        raise FileNotFoundError(
            f"no TensorBoard event files under {root}: pass a run folder or a dict of curves"
        )
    curves = {}
    for d in dirs:
        ea = EventAccumulator(str(d), size_guidance={"scalars": 0})
        ea.Reload()
        prefix = "" if d == root else f"{d.relative_to(root).as_posix()}/"
        for tag in ea.Tags()["scalars"]:
            ev = ea.Scalars(tag)
            curves[prefix + tag] = ([e.step for e in ev], [e.value for e in ev])
    return curves


def plot_training_curves(run_dir_or_dict, path, smoothing=0.6, ncols=3) -> dict:
    """One panel per scalar (raw faint, smoothed bold) from a run folder's TensorBoard
    events or a dict name -> (steps, values). Scalars logged at a single step (final scores,
    speeds: metrics.json holds them) get no panel unless nothing else was logged. Returns the
    curves it plotted."""
    p = _out_path(path, (".png", ".pdf", ".svg"))
    curves = (
        dict(run_dir_or_dict)
        if isinstance(run_dir_or_dict, dict)
        else _read_events(run_dir_or_dict)
    )
    curves = {
        k: (np.asarray(s, float), _np(v).astype(float))
        for k, (s, v) in sorted(curves.items())
        if len(v)
    }
    if not curves:
        raise ValueError("no scalars to plot: log some values first")
    # a point is not a curve, and a panel each made a multi-stage run's figure metres tall
    curves = {k: c for k, c in curves.items() if len(c[0]) > 1} or curves
    from matplotlib.figure import (
        Figure,
    )  # a bare Figure draws with Agg, outside pyplot: no global state to close

    ncols = min(ncols, len(curves))
    nrows = math.ceil(len(curves) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows))
    for i, (name, (steps, vals)) in enumerate(curves.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        smooth = (
            smoothing and len(vals) >= 20
        )  # a few eval points are plotted as they are, not lagged
        line = ax.plot(
            steps, vals, alpha=0.3 if smooth else 1.0, lw=1, marker=None if smooth else "."
        )[0]
        if smooth:
            ax.plot(steps, _smooth(vals, smoothing), color=line.get_color(), lw=1.6)
        if vals.min() > 0 and vals.max() / vals.min() > 100:  # losses spanning decades
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(p, dpi=100)
    return curves


class TrainingPlotter:
    """Collect scalars in memory and plot them:
    `plotter.log(step, loss=0.1); plotter.save(path)`."""

    def __init__(self, smoothing=0.6):
        self.smoothing, self.history = smoothing, {}

    def log(self, step, **scalars):
        for k, v in scalars.items():
            steps, vals = self.history.setdefault(k, ([], []))
            steps.append(int(step))
            vals.append(float(v))

    def save(self, path) -> dict:
        return plot_training_curves(self.history, path, self.smoothing)


def _mean_std(c, name):
    if isinstance(c, (tuple, list)) and len(c) == 2 and all(np.ndim(_np(e)) == 1 for e in c):
        mean, std = _np(c[0]), _np(c[1])
    else:
        a = _np(c)
        mean, std = (a.mean(0), a.std(0)) if a.ndim == 2 else (a, None)  # (N, T) per-frame values
    if mean.ndim != 1 or not len(mean) or (std is not None and std.shape != mean.shape):
        raise ValueError(
            f"curve '{name}' must be 1-D, an (N, T) array or a (mean, std) pair of equal length"
        )
    return mean, std


def plot_metric_vs_horizon(
    curves, path, metric="PSNR", context=None, train_horizon=None, title=None
) -> Path:
    """Metric per predicted frame (x = 1, 2, ...) for several methods: dict name -> curve,
    (mean, std) or (N, T) per-frame values; `train_horizon` draws where training stopped."""
    p = _out_path(path, (".png", ".pdf", ".svg"))
    if not isinstance(curves, dict) or not curves:
        raise ValueError("curves must be a non-empty dict method -> per-frame values")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    for name, c in curves.items():
        mean, std = _mean_std(c, name)
        x = np.arange(1, len(mean) + 1)
        line = ax.plot(x, mean, marker="o" if len(x) <= 30 else None, ms=3, label=str(name))[0]
        if std is not None:
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    if train_horizon is not None:
        ax.axvline(
            train_horizon, color="grey", ls="--", lw=1, label=f"training horizon ({train_horizon})"
        )
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # frames are whole numbers
    ax.set_xlabel("predicted frame" + (f" (after {context} context frames)" if context else ""))
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs prediction horizon")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(p, dpi=100)
    return p


# ---------------------------------------------------------------- latents
def latent_to_rgb(z) -> torch.Tensor:
    """PCA of latent channels to 3 components, one basis shared by all frames, each
    component min-max scaled to [0, 1]: (C, H, W) -> (3, H, W), (T, C, H, W) -> (T, 3, H, W).
    C < 3 leaves the missing components at 0."""
    x = _np(z).astype(np.float64)
    if x.ndim not in (3, 4) or not np.isfinite(x).all():
        raise ValueError(
            f"latent must be finite (C, H, W) or (T, C, H, W), got shape {tuple(x.shape)}"
        )
    single = x.ndim == 3
    x = x[None] if single else x
    n_t, c, h, w = x.shape
    flat = x.transpose(0, 2, 3, 1).reshape(-1, c)
    flat -= flat.mean(0)
    vecs = np.linalg.eigh(flat.T @ flat)[1][:, ::-1][:, :3]
    vecs = vecs * np.sign(
        vecs[np.abs(vecs).argmax(0), np.arange(vecs.shape[1])]
    )  # fixed signs: stable colours
    proj = np.pad(flat @ vecs, ((0, 0), (0, 3 - vecs.shape[1])))
    lo, hi = proj.min(0), proj.max(0)
    proj = (proj - lo) / np.maximum(hi - lo, 1e-12)
    out = torch.from_numpy(proj.reshape(n_t, h, w, 3).transpose(0, 3, 1, 2).astype(np.float32))
    return out[0] if single else out


def save_latent_picture(z, path, upscale=8, fps=4, title="default") -> Path:
    """PCA picture of a latent: .png (frames side by side, a title above that says how to read
    it; title=None for none) or .gif (animated)."""
    p = _out_path(path, (".png", ".gif"))
    rgb = latent_to_rgb(z)
    u = _rgb(rgb[None] if rgb.ndim == 3 else rgb, upscale)
    if p.suffix.lower() == ".gif":
        _write_gif(u, p, fps)
        return p
    strip = _stack(list(u[:, None]), 2, 2)[0]
    if title == "default":
        channels = _np(z).shape[-3]
        title = (
            f"latent PCA: the 3 main directions of its {channels} channels as red, green, blue; "
            "similar colours, similar latents; frames left to right"
        )
    if title:
        strip = np.concatenate(
            [_text(_wrap(title, strip.shape[1], _font()), strip.shape[1])[0], strip]
        )
    Image.fromarray(strip).save(p)
    return p


# ---------------------------------------------------------------- tensorboard
def _encode_gif(frames, fps) -> bytes:
    buf = io.BytesIO()
    _write_gif(frames, buf, fps)
    return buf.getvalue()


def gif_bytes(video_or_videos, fps=8) -> bytes:
    """Encoded animated GIF of a video, or of an uncaptioned grid for a batch/list."""
    return _encode_gif(_frames_of(video_or_videos), fps)


def log_video(writer, tag, video_or_batch, step, fps=8):
    """Log an animated GIF to a torch SummaryWriter as an image summary. TensorBoard's own
    add_video silently logs nothing without moviepy; this needs only Pillow."""
    if writer is None:  # non-zero DDP ranks pass no writer
        return
    from tensorboard.compat.proto.summary_pb2 import Summary

    frames = _frames_of(video_or_batch)
    img = Summary.Image(
        height=frames.shape[1],
        width=frames.shape[2],
        colorspace=3,
        encoded_image_string=_encode_gif(frames, fps),
    )
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=img)]), step)
