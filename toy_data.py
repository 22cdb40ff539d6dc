"""Video data sets with no download: prompted shapes, physics, Moving MNIST, smoke, your own videos.

Every data set yields float32 videos (T, C, H, W) in [0, 1], deterministic per (seed, split,
index): sample i comes from np.random.default_rng([seed, split_id, i]), so a validation set never
changes and train/val/test are disjoint random streams. No two splits share a video: folders split
by file, one .npz/.npy by position (80/10/10), a test file (time-first .npy as mnist_test_seq.npy,
or an .npz written with --split test) serves the test split only, and Moving MNIST's val and test
digits are never training digits. A --data-dir implies its kind (data_kind). Kinds (make_dataset,
KINDS):

    shapes          {video, prompt, attrs}  circles/squares/triangles moving, rotating; colour
                                            gradients; bouncing balls. parse_prompt inverts prompts
    bouncing_balls  {video, states}         1-5 balls, elastic collisions
    pendulum, falling, projectile           damped pendulum; gravity + drag + bouncy floor; trail
    moving_mnist    {video, states}         the original bouncing-digits rules, 1 channel
    smoke           {video}                 2D incompressible smoke rising from coloured sources
    agent           {video, actions,        a yellow agent moved by actions (none, up, down,
                     states, events}        left, right) pushes balls in a walled room
    folder, npz     {video}                 your .mp4/.gif/... or frame folders; a saved .npz/.npy
                                            (folder: + actions from <stem>.actions.txt files)
States: (T, objects, 4) x, y, vx, vy in output pixels per frame; NaN rows for absent objects
(agent: (T, 4, 2) cells, see Agent). actions[t] is the action taken after frame t.

    from toy_data import make_dataset, ToyDataset, parse_prompt, collate
    ds = make_dataset("bouncing_balls", num_samples=1000, resolution=64, num_frames=16)
    ds[0]["video"].shape                      # torch.Size([16, 3, 64, 64])
    item = ToyDataset(100)[3]  # item["prompt"] e.g. "A red circle moving from left to right"
    assert parse_prompt(item["prompt"]) == item["attrs"]
    loader = torch.utils.data.DataLoader(ToyDataset(1000), batch_size=8, collate_fn=collate)

    python toy_data.py --kind smoke --num 256 --out smoke.npz --preview smoke.gif
    python toy_data.py --data-dir my_videos --num 100 --out mine.npz   # --kind folder implied
    # the standard Moving MNIST test layout (20, N, 64, 64), digits never used in training:
    python toy_data.py --kind moving_mnist --split test --num 10000 --frames 20 \
        --out mnist_test_seq.npy
    python toy_data.py bench                  # frames/s per kind on one core

Layout: shared helpers (vocabulary, the per-index data set base, drawing, 2D motion); one
section per generated kind (smoke, prompted shapes, bouncing balls, pendulum, falling objects,
projectile, agent in a room, Moving MNIST); the loaders of real files (video folders, .npz/.npy,
MNIST IDX); make_dataset and the clip helpers; the command line.
"""

import argparse
import contextlib
import functools
import gzip
import hashlib
import json
import math
import os
import re
import struct
import time
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

# ----------------------------------------------------------------------------- vocabulary
COLORS = {
    "red": (0.95, 0.15, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.35, 1.0),
    "yellow": (1.0, 0.9, 0.1),
    "purple": (0.65, 0.2, 0.9),
    "orange": (1.0, 0.55, 0.05),
    "cyan": (0.1, 0.85, 0.9),
    "white": (1.0, 1.0, 1.0),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = (
    "left_to_right",
    "right_to_left",
    "top_to_bottom",
    "bottom_to_top",
    "top_left_to_bottom_right",
    "bottom_right_to_top_left",
    "top_right_to_bottom_left",
    "bottom_left_to_top_right",
)
ROTATIONS = ("clockwise", "counter-clockwise")
KINDS = (
    "shapes",
    "bouncing_balls",
    "pendulum",
    "falling",
    "projectile",
    "moving_mnist",
    "smoke",
    "agent",
    "folder",
    "npz",
)
SPLITS = ("train", "val", "test")
_SIDES = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}


def _need(value, valid, what):
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(map(str, valid))}")
    return value


def _check_size(resolution, num_frames):
    if min(np.atleast_1d(resolution)) < 8:
        raise ValueError(f"resolution {resolution} is too small: use at least 8 pixels")
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _side_vector(side):
    """'top_left' -> (-1, -1): the sum of the named sides' unit steps."""
    return np.sum([_SIDES[w] for w in side.split("_")], axis=0)


def direction_vector(direction):
    """'top_left_to_bottom_right' -> (1, 1): signs of the motion in x and y (y points down)."""
    start, end = _need(direction, DIRECTIONS, "direction").split("_to_")
    return tuple(int(s) for s in np.sign(_side_vector(end) - _side_vector(start)))


# ----------------------------------------------------------------------------- data set base
@contextlib.contextmanager
def _one_thread():
    """Generation works on small tensors: extra threads cost more than they save, and on a busy
    machine their barriers made smoke ~30x slower. Restores the caller's setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _Synthetic(Dataset):
    """Generated data: sample i is make(default_rng([seed, split_id, i])), rebuilt on every
    access."""

    channels = 3

    def __init__(self, num_samples, resolution, num_frames, seed, split):
        _check_size(resolution, num_frames)
        self.n = num_samples
        self.res = resolution
        self.t = num_frames
        self.seed = seed
        self.split_id = SPLITS.index(_need(split, SPLITS, "split"))

    def __len__(self):
        return self.n

    def rng(self, i):
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} samples")
        return np.random.default_rng([self.seed, self.split_id, i % self.n])

    def __getitem__(self, i):
        with _one_thread():
            return self.make(self.rng(i))


# ----------------------------------------------------------------------------- drawing
# Shapes come from (signed) distance fields on a (T, H, W) grid in pixel units: every frame is
# drawn at once, and edges are anti-aliased, coverage = clip(0.5 - distance, 0, 1).
def _grid(h, w):
    return np.arange(h, dtype=np.float32) + 0.5, np.arange(w, dtype=np.float32) + 0.5


def disc_masks(cx, cy, r, h, w):
    """Discs with centres cx, cy (any shape S, pixels) and radius r -> coverage (*S, h, w)."""
    ys, xs = _grid(h, w)
    cx, cy, r = (np.asarray(a, np.float32)[..., None] for a in np.broadcast_arrays(cx, cy, r))
    # (r^2 - d^2) / 2r equals r - d at the edge and needs no square root: 2 full-size passes
    ax = (xs - cx) ** 2 / (2 * r)
    ay = (ys - cy) ** 2 / (2 * r)
    m = (r / 2 + 0.5 - ax)[..., None, :] - ay[..., :, None]
    return np.clip(m, 0, 1, out=m)


def polygon_masks(shape, cx, cy, size, angle, h, w):
    """Square (size = half side) or equilateral triangle (size = circumradius), (T, h, w).
    cx, cy, angle: (T,); angle in radians, positive = clockwise on screen (y points down)."""
    ys, xs = _grid(h, w)
    if shape == "square":
        normals = angle[:, None] + np.arange(4) * np.pi / 2
        offset = size
    else:  # edge normals point away from the opposite vertex; the first vertex points up
        normals = angle[:, None] + np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        offset = size / 2
    normals = np.asarray(normals, np.float32)
    cx = np.asarray(cx, np.float32)
    cy = np.asarray(cy, np.float32)
    px = np.cos(normals)[..., None] * (xs - cx[:, None, None])  # (T, k, W)
    py = np.sin(normals)[..., None] * (ys - cy[:, None, None])  # (T, k, H)
    d = px[:, 0, None, :] + py[:, 0, :, None]
    for k in range(1, normals.shape[1]):  # max over edge lines: exact distance along the edges
        np.maximum(d, px[:, k, None, :] + py[:, k, :, None], out=d)
    d -= offset + 0.5
    return np.clip(-d, 0, 1, out=d)


def segment_masks(x0, y0, x1, y1, half_width, h, w):
    """Line segments from (x0, y0) to (x1[t], y1[t]), pixels -> (T, h, w)."""
    ys, xs = _grid(h, w)
    dx = (x1 - x0)[:, None, None]
    dy = (y1 - y0)[:, None, None]
    qx = (xs - x0)[None, None, :]
    qy = (ys - y0)[None, :, None]
    s = np.clip((qx * dx + qy * dy) / (dx * dx + dy * dy + 1e-6), 0, 1)
    return np.clip(0.5 + half_width - np.sqrt((qx - s * dx) ** 2 + (qy - s * dy) ** 2), 0, 1)


def _shape_masks(shape, cx, cy, r, angle, h, w):
    """Any shape inscribed in a circle of radius r, so it stays inside that circle at any angle."""
    if shape == "circle":
        return disc_masks(cx, cy, r, h, w)
    size = r / math.sqrt(2) if shape == "square" else r
    return polygon_masks(shape, cx, cy, size, angle, h, w)


def _compose(masks, colors):
    """(n, T, H, W) coverages and n RGB colours -> (T, 3, H, W) tensor (additive, clipped).
    A plain loop, not a matmul: BLAS would start threads that fight the data-loader workers."""
    img = np.zeros((masks.shape[1], 3, *masks.shape[2:]), np.float32)
    for m, c in zip(masks, np.asarray(colors, np.float32)):
        img += m[:, None] * c[:, None, None]
    return torch.from_numpy(np.clip(img, 0, 1, out=img))


# ----------------------------------------------------------------------------- 2D motion
# Simulated in a unit box with time in frames, so motion does not depend on the resolution.
# Scalar Python loops: with <= 5 objects they beat numpy's per-call overhead.
def _wall(p, v, r, e):
    """Reflect a coordinate off the walls at r and 1 - r with restitution e."""
    if p < r:
        return r + e * (r - p), e * abs(v)
    if p > 1 - r:
        return 1 - r - e * (p - 1 + r), -e * abs(v)
    return p, v


def _ballistic(x, y, vx, vy, r, t, g, drag, e, substeps=2):
    """One object under gravity and air drag, bouncing off floor and walls with restitution e."""
    out = np.empty((t, 4), np.float32)
    dt = 1.0 / substeps
    for f in range(t):
        for _ in range(substeps if f else 0):  # frame 0 is the initial state
            vx = vx * (1 - drag * dt)
            vy = (vy + g * dt) * (1 - drag * dt)
            x, vx = _wall(x + vx * dt, vx, r, e)
            y, vy = _wall(y + vy * dt, vy, r, e)
        out[f] = x, y, vx, vy
    return out


def _pad_states(states, res, num):
    out = np.full((states.shape[0], num, 4), np.nan, np.float32)  # NaN rows: absent objects
    out[:, : states.shape[1]] = states * res
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------- smoke
def divergence(u, v):
    """Central-difference divergence of a periodic velocity field (x along the last axis)."""
    return (u.roll(-1, -1) - u.roll(1, -1) + v.roll(-1, -2) - v.roll(1, -2)) / 2


@functools.lru_cache(maxsize=4)
def _spectral(h, w):
    dx = 1j * torch.sin(2 * math.pi * torch.fft.rfftfreq(w))[None, :]  # central differences
    dy = 1j * torch.sin(2 * math.pi * torch.fft.fftfreq(h))[:, None]  # in Fourier space
    lap = (dx * dx + dy * dy).real
    return dx, dy, torch.where(lap != 0, 1 / lap, 0)


def pressure_project(u, v):
    """Exact pressure projection of a periodic (H, W) velocity field: solve lap(p) = div(u, v)
    with FFTs and subtract grad(p), so divergence() vanishes. Also removes the mean flow, which
    buoyancy would otherwise accelerate forever in a periodic box."""
    dx, dy, inv_lap = _spectral(*u.shape[-2:])
    uh, vh = torch.fft.rfft2(torch.stack([u, v]))
    p = (dx * uh + dy * vh) * inv_lap
    uvh = torch.stack([uh - dx * p, vh - dy * p])
    uvh[..., 0, 0] = 0
    return torch.fft.irfft2(uvh, s=u.shape[-2:]).unbind(0)


@functools.lru_cache(maxsize=4)
def _base_grid(h, w, pad):
    ys, xs = torch.meshgrid(torch.arange(h) + pad, torch.arange(w) + pad, indexing="ij")
    scale = torch.tensor([2 / (w + 2 * pad - 1), 2 / (h + 2 * pad - 1)])
    return torch.stack([xs, ys], -1) * scale - 1, scale


def advect(fields, u, v, pad=4):
    """Semi-Lagrangian step: fields (F, H, W) sampled bilinearly at (x - u, y - v), periodic.
    Circular padding lets grid_sample wrap around, for |u|, |v| < pad cells per step."""
    grid, scale = _base_grid(*fields.shape[-2:], pad)
    back = torch.stack([u, v], -1).clamp(1 - pad, pad - 1) * scale
    padded = F.pad(fields[None], (pad,) * 4, mode="circular")
    return F.grid_sample(padded, (grid - back)[None], align_corners=True)[0]


def _blob(xs, ys, grid, cx, cy, rad):
    """A Gaussian bump at (cx, cy) of width rad, in units of the box, on the (grid, grid) cells."""
    return np.exp(-((xs - cx * grid) ** 2 + (ys - cy * grid) ** 2) / (2 * (rad * grid) ** 2))


def _smoke_sources(rng, xs, ys, grid, num_sources):
    """Density added every step, (3, grid, grid): 1-3 coloured blobs near the bottom."""
    src = 0
    for _ in range(num_sources or int(rng.integers(1, 4))):
        strength = rng.uniform(0.05, 0.1)
        cx = rng.uniform(0.2, 0.8)
        cy = rng.uniform(0.75, 0.92)
        rad = rng.uniform(0.04, 0.08)
        color = np.asarray(COLORS[_pick(rng, list(COLORS))], np.float32)
        src = src + strength * _blob(xs, ys, grid, cx, cy, rad) * color[:, None, None]
    return torch.from_numpy(src.astype(np.float32))


def _smoke_swirl(rng, xs, ys, grid):
    """The initial velocity (u, v), 1-2 cells per step at most, so the flow is not laminar:
    random vortices from a stream function psi."""
    psi = 0
    for _ in range(int(rng.integers(3, 7))):
        weight = rng.normal()
        cx = rng.uniform(0, 1)
        cy = rng.uniform(0.2, 1)
        rad = rng.uniform(0.06, 0.15)
        psi = psi + weight * _blob(xs, ys, grid, cx, cy, rad)
    psi = torch.from_numpy(psi)
    u, v = pressure_project(
        (psi.roll(-1, 0) - psi.roll(1, 0)) / 2, (psi.roll(1, 1) - psi.roll(-1, 1)) / 2
    )
    speed = rng.uniform(1, 2) / (torch.maximum(u.abs().max(), v.abs().max()) + 1e-6)
    return u * speed, v * speed


def _smoke_step(fields, src, keep, buoyancy, vorticity):
    """One frame of fields (u, v, 3 densities): advection, sources, dissipation, buoyancy,
    vorticity confinement, projection. Returns the new fields and the density."""
    fields = advect(fields, fields[0], fields[1])
    dens = (fields[2:] + src) * keep
    u = fields[0]
    v = fields[1] - buoyancy * dens.sum(0)  # y points down: dense smoke rises
    # vorticity confinement: a push along grad|w| x w restores the swirls numerical diffusion smears
    w = (v.roll(-1, 1) - v.roll(1, 1) - u.roll(-1, 0) + u.roll(1, 0)) / 2
    a = w.abs()
    gx = a.roll(-1, 1) - a.roll(1, 1)
    gy = a.roll(-1, 0) - a.roll(1, 0)
    push = vorticity * w / (torch.sqrt(gx * gx + gy * gy) + 1e-5)
    u, v = pressure_project((u + gy * push) * 0.995, (v - gx * push) * 0.995)
    return torch.cat([u[None], v[None], dens]), dens


def simulate_smoke(rng, t, grid=64, warmup=24, buoyancy=0.3, vorticity=0.2, num_sources=None):
    """Coloured smoke frames (T, 3, grid, grid) in [0, 1]; one step per frame, cells as units."""
    ys, xs = np.mgrid[0:grid, 0:grid].astype(np.float32)
    src = _smoke_sources(rng, xs, ys, grid, num_sources)
    u, v = _smoke_swirl(rng, xs, ys, grid)
    fields = torch.cat([u[None], v[None], torch.zeros(3, grid, grid)])
    # dissipation, plus absorbing bands at the top and sides: the box is periodic, smoke must not
    # wrap around
    ramp = torch.clamp(torch.arange(grid, dtype=torch.float32) / 4, max=1)
    keep = 0.98 * ramp[:, None] ** 1.5 * (ramp * ramp.flip(0))[None, :]
    frames = torch.empty(t, 3, grid, grid)
    for s in range(warmup + t):
        fields, dens = _smoke_step(fields, src, keep, buoyancy, vorticity)
        if s >= warmup:
            frames[s - warmup] = dens
    return 1 - torch.exp(-2 * frames)


class Smoke(_Synthetic):
    """2D smoke: semi-Lagrangian advection, buoyancy, FFT pressure projection, 1-3 coloured
    sources."""

    def __init__(
        self, num_samples, resolution=64, num_frames=16, seed=0, split="train", grid=64, warmup=24
    ):
        super().__init__(num_samples, resolution, num_frames, seed, split)
        self.grid = grid
        self.warmup = warmup

    def make(self, rng):
        video = simulate_smoke(rng, self.t, self.grid, self.warmup)
        if self.res != self.grid:
            video = F.interpolate(video, size=(self.res, self.res), mode="bilinear", antialias=True)
            video = video.clamp(0, 1)
        return {"video": video}


# ----------------------------------------------------------------------------- prompted shapes
def make_prompt(attrs):
    c = attrs["color"]
    kind = attrs["type"]
    c = ("An " if c[0] in "aeiou" else "A ") + c
    if kind == "moving":
        a, b = (s.replace("_", " ") for s in attrs["motion"].split("_to_"))
        return f"{c} {attrs['shape']} moving from {a} to {b}"
    if kind == "rotating":
        return f"{c} {attrs['shape']} rotating {attrs['motion']}"
    if kind == "color_transition":
        return f"Color gradient transitioning from {attrs['color']} to {attrs['color_to']}"
    return f"{c} ball bouncing"


def _attrs(kind, shape, color, color_to, motion):
    _need(color, COLORS, "color")
    if color_to is not None:
        _need(color_to, COLORS, "color")
    if kind == "moving":
        _need(shape, SHAPES, "shape")
        _need(motion, DIRECTIONS, "direction")
    elif kind == "rotating":  # a rotating circle looks static
        _need(shape, SHAPES[1:], "rotating shape")
        _need(motion, ROTATIONS, "rotation")
    return {"type": kind, "shape": shape, "color": color, "color_to": color_to, "motion": motion}


def parse_prompt(prompt):
    """Invert make_prompt: 'A blue square rotating clockwise' -> attrs dict."""
    p = prompt.strip().rstrip(".").lower()
    if m := re.fullmatch(r"an? (\w+) (\w+) moving from ([a-z ]+) to ([a-z ]+)", p):
        motion = "_".join(m[3].split()) + "_to_" + "_".join(m[4].split())
        return _attrs("moving", m[2], m[1], None, motion)
    if m := re.fullmatch(r"an? (\w+) (\w+) rotating ([a-z-]+)", p):
        return _attrs("rotating", m[2], m[1], None, m[3])
    if m := re.fullmatch(r"colou?r gradient transitioning from (\w+) to (\w+)", p):
        return _attrs("color_transition", None, m[1], m[2], None)
    if m := re.fullmatch(r"an? (\w+) ball bouncing", p):
        return _attrs("bouncing", "circle", m[1], None, "bouncing")
    raise ValueError(
        f"cannot parse prompt {prompt!r}; expected e.g. 'A red circle moving from left to right' "
        "or 'Color gradient transitioning from blue to red'"
    )


def sample_attrs(rng):
    kind = ("moving", "rotating", "color_transition", "bouncing")[
        rng.choice(4, p=[0.4, 0.25, 0.15, 0.2])
    ]
    color = _pick(rng, list(COLORS))
    if kind == "moving":
        return _attrs(kind, _pick(rng, SHAPES), color, None, _pick(rng, DIRECTIONS))
    if kind == "rotating":
        return _attrs(kind, _pick(rng, SHAPES[1:]), color, None, _pick(rng, ROTATIONS))
    if kind == "color_transition":
        return _attrs(kind, None, color, _pick(rng, [c for c in COLORS if c != color]), None)
    return _attrs(kind, "circle", color, None, "bouncing")


def _path(rng, d, n, r, p, t):
    """Centre coordinates (T,) along one axis of size n: fixed if d == 0, else crossing most of
    the frame in the direction of d's sign, never leaving it."""
    lo = r + 1.5  # 1.5 px margin: anti-aliasing at a triangle's tip reaches ~1 px out
    hi = n - r - 1.5
    if d == 0:
        return np.full(t, rng.uniform(lo, hi), np.float32)
    length = rng.uniform(0.6, 1.0) * (hi - lo)
    return rng.uniform(lo, hi - length) + length * (p if d > 0 else 1 - p)


def _steady_path(rng, d, n, r, t, steady):
    """Centre coordinates (T,) along one axis of size n at a constant speed (that of a crossing
    in `steady` frames), from anywhere, modulo n: drawn on a torus, so the motion goes on past
    any length and the shape is never out of sight."""
    lo = r + 1.5
    hi = n - r - 1.5
    if d == 0:
        return np.full(t, rng.uniform(lo, hi), np.float32)
    speed = rng.uniform(0.6, 1.0) * (hi - lo) / (steady - 1)
    start = rng.uniform(0, n)
    return np.mod(start + np.sign(d) * speed * np.arange(t), n).astype(np.float32)


def _render_moving(rng, attrs, p, w, h, t, steady=0):
    r = rng.uniform(0.12, 0.2) * min(w, h)
    dx, dy = direction_vector(attrs["motion"])
    angle = np.zeros(t)
    if not steady:
        cx = _path(rng, dx, w, r, p, t)
        cy = _path(rng, dy, h, r, p, t)
        return _shape_masks(attrs["shape"], cx, cy, r, angle, h, w)
    cx = _steady_path(rng, dx, w, r, t, steady)
    cy = _steady_path(rng, dy, h, r, t, steady)
    # leaving one side it enters the other: a copy one frame size away along each moving axis
    return np.max(
        [
            _shape_masks(attrs["shape"], cx + ox, cy + oy, r, angle, h, w)
            for ox in ((-w, 0, w) if dx else (0,))
            for oy in ((-h, 0, h) if dy else (0,))
        ],
        0,
    )


STEADY_TURN = 0.14  # rad per frame of steady rotating clips (the middle of 0.08-0.2)


def _render_rotating(rng, attrs, w, h, t, steady=0):
    r = rng.uniform(0.2, 0.3) * min(w, h)
    cx = np.full(t, rng.uniform(r + 1.5, w - r - 1.5))
    cy = np.full(t, rng.uniform(r + 1.5, h - r - 1.5))
    sign = 1 if attrs["motion"] == "clockwise" else -1
    if steady:  # upright at frame 0, one speed: prompt and frame index decide the orientation
        return _shape_masks(attrs["shape"], cx, cy, r, sign * STEADY_TURN * np.arange(t), h, w)
    # at most ~11 deg per frame, far below a triangle's 60 deg symmetry: the direction is
    # unambiguous
    step = rng.uniform(0.08, 0.2) * sign
    angle = rng.uniform(0, 2 * np.pi) + step * np.arange(t)
    return _shape_masks(attrs["shape"], cx, cy, r, angle, h, w)


def _render_gradient(rng, attrs, color, p, w, h):
    """A soft gradient band sweeps from one colour to the other, at a random angle."""
    a = rng.uniform(0, 2 * np.pi)
    ys, xs = _grid(h, w)
    u = (math.cos(a) * xs / w)[None, :] + (math.sin(a) * ys / h)[:, None]
    alpha = np.clip(2 * p[:, None, None] - 1 + (u - u.min()) / (u.max() - u.min() + 1e-6), 0, 1)
    color_to = np.asarray(COLORS[attrs["color_to"]], np.float32)
    return torch.from_numpy(
        color[:, None, None] + alpha[:, None] * (color_to - color)[:, None, None]
    )


def _render_bouncing(rng, w, h, t):
    """Parabolic hops on the floor (gravity) while drifting between the walls."""
    r = rng.uniform(0.1, 0.15) * min(w, h)
    lo = r + 1
    floor = h - r - 1
    span = w - 2 * r - 2
    f = (np.arange(t) / rng.uniform(6, 12) + rng.uniform()) % 1  # phase within a hop
    cy = floor - rng.uniform(0.4, 0.9) * (floor - lo) * 4 * f * (1 - f)
    s = rng.uniform(0, span) + rng.choice([-1, 1]) * rng.uniform(0.01, 0.04) * w * np.arange(t)
    cx = lo + span - np.abs(span - np.mod(s, 2 * span))  # triangle wave: walls
    return disc_masks(cx, cy, r, h, w)


def steady_progress(t, steady):
    """A colour transition's progress (T,) in a steady clip: 0 -> 1 over `steady` frames, back to 0
    over the next steady - 1, and so on (a triangle wave: the colours cycle)."""
    q = np.mod(np.arange(t) / (steady - 1), 2)
    return (1 - np.abs(1 - q)).astype(np.float32)


def render_attrs(rng, attrs, w, h, t, steady=0):
    """Draw the video an attrs dict describes; the layout (position, size, speed) comes from rng.

    steady = n > 1: rules per frame, the same at any length t (a t-frame clip starts as the
    n-frame one): shapes move at the speed of an n-frame crossing from anywhere and wrap around
    the frame (a torus), rotating shapes start upright and turn STEADY_TURN rad per frame,
    gradients cycle with period 2 (n - 1), balls bounce as always. 0: the default clips, whose
    motion spans the clip's length."""
    color = np.asarray(COLORS[attrs["color"]], np.float32)
    kind = attrs["type"]
    p = np.linspace(0, 1, t, dtype=np.float32) if t > 1 else np.zeros(1, np.float32)
    if steady:
        p = steady_progress(t, steady)
    if kind == "color_transition":
        return _render_gradient(rng, attrs, color, p, w, h)
    if kind == "moving":
        mask = _render_moving(rng, attrs, p, w, h, t, steady)
    elif kind == "rotating":
        mask = _render_rotating(rng, attrs, w, h, t, steady)
    else:
        mask = _render_bouncing(rng, w, h, t)
    return torch.from_numpy(mask[:, None] * color[:, None, None])


class ToyVideoGenerator:
    """Single prompted videos on demand: each call draws a fresh layout from one seeded stream."""

    def __init__(self, width=64, height=64, num_frames=16, seed=0):
        _check_size((width, height), num_frames)
        self.w = width
        self.h = height
        self.t = num_frames
        self.rng = np.random.default_rng(seed)

    def _make(self, *args):
        attrs = _attrs(*args)
        return render_attrs(self.rng, attrs, self.w, self.h, self.t), make_prompt(attrs)

    def generate_moving_shape(self, shape, color, direction):
        return self._make("moving", shape, color, None, direction)

    def generate_rotating_shape(self, shape, color, direction="clockwise"):
        return self._make("rotating", shape, color, None, direction)

    def generate_color_transition(self, color_from, color_to):
        return self._make("color_transition", None, color_from, color_to, None)

    def generate_bouncing_ball(self, color="red"):
        return self._make("bouncing", "circle", color, None, "bouncing")


class ToyDataset(_Synthetic):
    """Prompted shapes: {"video": (T, 3, H, W), "prompt": str, "attrs": dict}."""

    def __init__(
        self, num_samples=100, width=64, height=64, num_frames=16, seed=0, split="train", steady=0
    ):
        super().__init__(num_samples, (width, height), num_frames, seed, split)
        if steady == 1 or steady < 0:
            raise ValueError(f"steady must be 0 (off) or a clip length >= 2, got {steady}")
        self.w = width
        self.h = height
        self.steady = steady  # render_attrs: rules per frame that go on past any length

    def make(self, rng):
        attrs = sample_attrs(rng)  # drawn first, so prompts are known without rendering
        video = render_attrs(rng, attrs, self.w, self.h, self.t, self.steady)
        return {"video": video, "prompt": make_prompt(attrs), "attrs": attrs}

    def save_prompts(self, path):
        """One prompt per line (.txt), or a JSON list of {"index", "prompt", "attrs"} (.json)."""
        attrs = [sample_attrs(self.rng(i)) for i in range(self.n)]
        with open(path, "w") as f:
            if str(path).endswith(".json"):
                json.dump(
                    [
                        {"index": i, "prompt": make_prompt(a), "attrs": a}
                        for i, a in enumerate(attrs)
                    ],
                    f,
                )
            else:
                f.write("".join(make_prompt(a) + "\n" for a in attrs))


# ----------------------------------------------------------------------------- bouncing balls
def _ball_starts(rng, r):
    """Non-overlapping start centres (n, 2) for balls of radii r, by rejection."""
    pos = []
    while len(pos) < len(r):
        k = len(pos)
        p = rng.uniform(0.1, 0.9, 2)
        if all(math.dist(p, q) > r[k] + r[j] + 0.01 for j, q in enumerate(pos)):
            pos.append(p)
    return np.array(pos)


def _collide(x, y, vx, vy, r, i, j):
    """Balls i and j, if they overlap: when approaching, equal masses exchange their normal
    velocities; then the pair is pushed apart. Updates the lists in place."""
    dx = x[i] - x[j]
    dy = y[i] - y[j]
    rr = r[i] + r[j]
    d = math.sqrt(dx * dx + dy * dy)
    if d >= rr or d == 0:
        return
    nx = dx / d
    ny = dy / d
    push = (rr - d) / 2
    vn = min(0.0, (vx[i] - vx[j]) * nx + (vy[i] - vy[j]) * ny)
    vx[i] -= vn * nx
    vy[i] -= vn * ny
    vx[j] += vn * nx
    vy[j] += vn * ny
    x[i] += push * nx
    y[i] += push * ny
    x[j] -= push * nx
    y[j] -= push * ny


def _balls_substep(x, y, vx, vy, r, gravity, dt):
    """Move every ball, resolve pairwise collisions, then the walls. Updates the lists in place."""
    n = len(r)
    for i in range(n):
        vy[i] += gravity * dt
        x[i] += vx[i] * dt
        y[i] += vy[i] * dt
    for i in range(n):
        for j in range(i + 1, n):
            _collide(x, y, vx, vy, r, i, j)
    for i in range(n):  # walls last, so states always lie inside the box
        x[i], vx[i] = _wall(x[i], vx[i], r[i], 1.0)
        y[i], vy[i] = _wall(y[i], vy[i], r[i], 1.0)


def simulate_balls(rng, n, t, gravity=0.0, substeps=2):
    """(T, n, 4) x, y, vx, vy in the unit box (per frame) and the radii (n,)."""
    r = rng.uniform(0.06, 0.1, n).tolist()
    x, y = _ball_starts(rng, r).T.tolist()
    ang = rng.uniform(0, 2 * np.pi, n)
    speed = rng.uniform(0.02, 0.045, n)
    vx = (speed * np.cos(ang)).tolist()
    vy = (speed * np.sin(ang)).tolist()
    out = np.empty((t, n, 4), np.float32)
    for f in range(t):
        for _ in range(substeps if f else 0):  # frame 0 is the initial state
            _balls_substep(x, y, vx, vy, r, gravity, 1.0 / substeps)
        out[f] = np.array([x, y, vx, vy]).T
    return out, np.array(r, np.float32)


class BouncingBalls(_Synthetic):
    """1-5 balls of distinct colours, elastic ball-ball and wall collisions, no gravity by
    default."""

    def __init__(
        self,
        num_samples,
        resolution=64,
        num_frames=16,
        seed=0,
        split="train",
        num_balls=None,
        max_balls=5,
        gravity=0.0,
    ):
        super().__init__(num_samples, resolution, num_frames, seed, split)
        self.num_balls = num_balls
        self.max_balls = num_balls or max_balls
        self.gravity = gravity
        if not 1 <= self.max_balls <= len(COLORS):
            raise ValueError(
                f"use 1 to {len(COLORS)} balls (one colour each), got {self.max_balls}"
            )

    def make(self, rng):
        res = self.res
        n = self.num_balls or int(rng.integers(1, self.max_balls + 1))
        s, r = simulate_balls(rng, n, self.t, self.gravity)
        colors = [COLORS[c] for c in rng.permutation(list(COLORS))[:n]]
        masks = disc_masks(s[..., 0].T * res, s[..., 1].T * res, r[:, None] * res, res, res)
        return {"video": _compose(masks, colors), "states": _pad_states(s, res, self.max_balls)}


# ----------------------------------------------------------------------------- pendulum
_PIVOT = (0.5, 0.12)  # in the unit box
_BOB_RADIUS = 0.06


def _swing(th, length, gravity, damping, substeps, t):
    """Bob states (T, 1, 4) in the unit box, released from rest at angle th; semi-implicit Euler."""
    px, py = _PIVOT
    om = 0.0
    dt = 1.0 / substeps
    s = np.empty((t, 1, 4), np.float32)
    for f in range(t):
        for _ in range(substeps if f else 0):  # frame 0 is the initial state
            om -= gravity / length * math.sin(th) * dt  # velocity first, then angle
            th += om * dt
        om *= damping if f else 1.0
        s[f, 0] = (
            px + length * math.sin(th),
            py + length * math.cos(th),
            length * math.cos(th) * om,
            -length * math.sin(th) * om,
        )
    return s


class Pendulum(_Synthetic):
    """A damped pendulum (semi-implicit Euler) released from rest; states are the bob's."""

    def __init__(
        self,
        num_samples,
        resolution=64,
        num_frames=16,
        seed=0,
        split="train",
        gravity=0.04,
        damping=0.995,
        substeps=4,
    ):
        super().__init__(num_samples, resolution, num_frames, seed, split)
        self.g = gravity
        self.damping = damping
        self.substeps = substeps

    def make(self, rng):
        res = self.res
        px, py = _PIVOT
        length = rng.uniform(0.35, 0.6)
        max_angle = math.asin(min(1.0, (0.46 - _BOB_RADIUS) / length))
        th = rng.choice([-1, 1]) * rng.uniform(0.4, 1.0) * max_angle
        s = _swing(th, length, self.g, self.damping, self.substeps, self.t)
        x = s[:, 0, 0] * res
        y = s[:, 0, 1] * res
        bob = disc_masks(x, y, _BOB_RADIUS * res, res, res)
        rod = segment_masks(px * res, py * res, x, y, max(0.5, 0.012 * res), res, res) * (1 - bob)
        pivot = disc_masks(
            np.full(self.t, px * res), np.full(self.t, py * res), 0.025 * res, res, res
        )
        color = COLORS[_pick(rng, list(COLORS)[:-1])]  # any but white, the pivot's colour
        layers = np.stack([rod, pivot * (1 - bob), bob])
        video = _compose(layers, [(0.6, 0.6, 0.6), (1, 1, 1), color])
        return {"video": video, "states": torch.from_numpy(s * res)}


# ----------------------------------------------------------------------------- falling objects
class FallingObjects(_Synthetic):
    """1-3 circles/squares dropped from near rest: gravity, air drag, restitution on the floor."""

    def __init__(
        self,
        num_samples,
        resolution=64,
        num_frames=16,
        seed=0,
        split="train",
        max_objects=3,
        gravity=0.015,
        drag=0.02,
    ):
        super().__init__(num_samples, resolution, num_frames, seed, split)
        self.max_objects = max_objects
        self.g = gravity
        self.drag = drag

    def _drop(self, rng, x, r):
        """States (T, 4) of one object of radius r dropped at x with a small random velocity."""
        y = rng.uniform(0.1, 0.45)
        vx = rng.uniform(-0.015, 0.015)
        vy = rng.uniform(-0.01, 0.01)
        restitution = rng.uniform(0.55, 0.8)
        return _ballistic(x, y, vx, vy, r, self.t, self.g, self.drag, restitution)

    def _mask(self, rng, x, y, r):
        """A circle or, as often, a square of half side 0.88 r."""
        res = self.res
        if rng.random() < 0.5:
            return disc_masks(x, y, r * res, res, res)
        return polygon_masks("square", x, y, 0.88 * r * res, np.zeros(self.t), res, res)

    def make(self, rng):
        res = self.res
        n = int(rng.integers(1, self.max_objects + 1))
        r = rng.uniform(0.06, 0.1, n)
        xs = np.clip(
            (np.arange(n) + rng.uniform(0.3, 0.7, n)) / n, r, 1 - r
        )  # one lane each: rare overlaps
        s = np.stack([self._drop(rng, xs[k], r[k]) for k in range(n)], 1)
        x = s[..., 0] * res
        y = s[..., 1] * res
        masks = np.stack([self._mask(rng, x[:, k], y[:, k], r[k]) for k in range(n)])
        colors = [COLORS[c] for c in rng.permutation(list(COLORS))[:n]]
        return {"video": _compose(masks, colors), "states": _pad_states(s, res, self.max_objects)}


# ----------------------------------------------------------------------------- projectile
class Projectile(_Synthetic):
    """A ball launched at 30-60 degrees under gravity, bouncing on the floor, with a fading
    trail."""

    def __init__(
        self,
        num_samples,
        resolution=64,
        num_frames=16,
        seed=0,
        split="train",
        gravity=0.005,
        trail=5,
    ):
        super().__init__(num_samples, resolution, num_frames, seed, split)
        self.g = gravity
        self.trail = trail

    def _launch(self, rng, r):
        """States (T, 4) of a ball of radius r launched from the floor near the left or right
        wall."""
        ang = np.deg2rad(rng.uniform(30, 60))
        speed = rng.uniform(0.05, 0.065)
        side = rng.choice([-1, 1])
        x0 = 0.5 - side * (0.5 - rng.uniform(0.08, 0.2))
        vx = side * speed * math.cos(ang)
        vy = -speed * math.sin(ang)
        return _ballistic(x0, 1 - r, vx, vy, r, self.t, self.g, 0.0, 0.6)

    def make(self, rng):
        res = self.res
        r = 0.055
        t = self.t
        s = self._launch(rng, r)
        x = s[:, 0] * res
        y = s[:, 1] * res
        k = np.arange(1, self.trail + 1)[:, None]  # ghost k shows the ball k frames ago
        past = np.maximum(np.arange(t) - k, 0)  # (trail, T): the frame each ghost copies
        fade = (0.5 * (1 - k / (self.trail + 1)) * (np.arange(t) >= k)).astype(np.float32)[
            ..., None, None
        ]
        ball = disc_masks(x, y, r * res, res, res)
        ghosts = disc_masks(x[past], y[past], r * res * (1 - 0.1 * k), res, res) * fade
        trail = ghosts.max(0) * (1 - ball)
        color = COLORS[_pick(rng, list(COLORS))]
        video = _compose(np.stack([trail, ball]), [color, color])
        return {"video": video, "states": torch.from_numpy(s[:, None] * res)}


# ----------------------------------------------------------------------------- agent in a room
# A grid room: walls, a yellow square the actions move one cell at a time, and balls it pushes.
# actions[t] acts after frame t and produces frame t+1. The agent kind is the one with actions.
ACTIONS = ("none", "up", "down", "left", "right")
MOVES = ((0, 0), (0, -1), (0, 1), (-1, 0), (1, 0))  # (dx, dy) in cells; y points down
EVENTS = ("idle", "moved", "blocked", "pushed", "ball_blocked")
AGENT_GRID = 8  # cells per side, the border cells being walls
AGENT_COLOR = COLORS["yellow"]
AGENT_BALL = COLORS["red"]  # every ball: far from yellow and from the grey walls
AGENT_MAX_BALLS = 3
WALL_GREY = 0.5


class AgentRoom:
    """The simulator: walls (grid, grid) bool, the agent's cell and the balls' cells as (x, y)."""

    def __init__(self, walls, agent, balls):
        self.walls = walls
        self.agent = tuple(agent)
        self.balls = [tuple(b) for b in balls]

    def copy(self):
        return AgentRoom(self.walls, self.agent, self.balls)

    def step(self, action):
        """Apply one action in place -> its event (an index of EVENTS). A move into a wall is
        blocked; into a ball it pushes the ball one cell, unless a wall or a ball is behind it."""
        if action == 0:
            return 0
        dx, dy = MOVES[action]
        x, y = self.agent
        to = (x + dx, y + dy)
        if self.walls[to[1], to[0]]:
            return 2
        if to in self.balls:
            behind = (to[0] + dx, to[1] + dy)
            if self.walls[behind[1], behind[0]] or behind in self.balls:
                return 4
            self.balls[self.balls.index(to)] = behind
            self.agent = to
            return 3
        self.agent = to
        return 1

    def cells(self):
        """(1 + balls, 2) int64: the agent's cell, then each ball's."""
        return np.array([self.agent, *self.balls], np.int64)


def agent_layout(rng, grid=AGENT_GRID):
    """A room from rng: border walls, 0-3 wall blocks inside, the agent and 2-3 balls on distinct
    free cells (balls away from the border, so most of them can be pushed)."""
    walls = np.zeros((grid, grid), bool)
    walls[[0, -1], :] = True
    walls[:, [0, -1]] = True
    inner = [(x, y) for y in range(1, grid - 1) for x in range(1, grid - 1)]
    order = rng.permutation(len(inner))
    n_blocks = int(rng.integers(0, 4))
    for k in order[:n_blocks]:
        walls[inner[k][1], inner[k][0]] = True
    free = [inner[k] for k in order[n_blocks:]]
    n_balls = int(rng.integers(2, AGENT_MAX_BALLS + 1))
    away = [c for c in free[1:] if 1 < c[0] < grid - 2 and 1 < c[1] < grid - 2]
    return AgentRoom(walls, free[0], away[:n_balls])


def agent_policy(rng, room, hold=4.0, seek=0.7, unstick=0.7):
    """Random actions held for a geometric number of steps (mean `hold`), switched sooner (with
    probability `unstick`) when the last one did not move the agent; a switch picks, with
    probability `seek`, a step toward a random ball (so pushes happen often), else any action."""
    action = int(rng.integers(len(ACTIONS)))
    while True:
        before = room.agent
        yield action
        stuck = action != 0 and room.agent == before
        if rng.random() < 1 / hold or (stuck and rng.random() < unstick):
            if rng.random() < seek and room.balls:
                bx, by = room.balls[int(rng.integers(len(room.balls)))]
                dx, dy = bx - room.agent[0], by - room.agent[1]
                horizontal = abs(dx) > abs(dy) or (abs(dx) == abs(dy) and rng.random() < 0.5)
                if horizontal:
                    action = 4 if dx > 0 else 3
                else:
                    action = 2 if dy > 0 else 1
            else:
                action = int(rng.integers(len(ACTIONS)))


def render_agent(walls, cells, res):
    """Frames (T, 3, res, res) of a room: cells (T, 1 + balls, 2) as from AgentRoom.cells."""
    cell = res // walls.shape[0]
    t = cells.shape[0]
    img = np.zeros((t, 3, res, res), np.float32)
    block = np.kron(walls, np.ones((cell, cell), np.float32))
    img += WALL_GREY * block[None, None]
    m = cell // 8  # a margin at 8 px cells and up, so the agent stands apart from a wall
    for f in range(t):
        x, y = cells[f, 0]
        img[f, :, y * cell + m : (y + 1) * cell - m, x * cell + m : (x + 1) * cell - m] = np.array(
            AGENT_COLOR, np.float32
        )[:, None, None]
    balls = cells[:, 1:]
    if balls.shape[1]:
        cx = (balls[..., 0].T + 0.5) * cell
        cy = (balls[..., 1].T + 0.5) * cell
        masks = disc_masks(cx, cy, 0.4 * cell, res, res)
        img += masks.sum(0)[:, None] * np.array(AGENT_BALL, np.float32)[:, None, None]
    return torch.from_numpy(np.clip(img, 0, 1, out=img))


def colour_weights(video, colour, colour_width=0.5):
    """Per pixel of frames (..., 3, H, W), how much it is of one colour: 1 - |pixel - colour| /
    colour_width, clamped at 0. -> (..., H, W)."""
    colour = torch.tensor(colour).view(3, 1, 1)
    return (1 - (video.float() - colour).norm(dim=-3) / colour_width).clamp(min=0)


def agent_cells(video, grid=AGENT_GRID):
    """The agent's position (..., 2) as (x, y) in cells, read from frames (..., 3, H, W): the
    centroid of its colour's weights (colour_weights of yellow), minus half a cell, so a simulated
    frame gives its cell exactly. NaN where they add up to less than a quarter of a sprite (the
    agent is lost)."""
    w = colour_weights(video, AGENT_COLOR)
    h, wd = w.shape[-2:]
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) * grid / h
    xs = (torch.arange(wd, dtype=torch.float32) + 0.5) * grid / wd
    mass = w.sum((-2, -1))
    x = (w * xs).sum((-2, -1)) / mass.clamp(min=1e-6) - 0.5
    y = (w * ys[:, None]).sum((-2, -1)) / mass.clamp(min=1e-6) - 0.5
    cell = h // grid
    lost = mass < 0.25 * (cell - 2 * (cell // 8)) ** 2
    pos = torch.stack([x, y], -1)
    return torch.where(lost[..., None], torch.nan, pos)


def ball_map(video, grid=AGENT_GRID):
    """Which cells hold a ball, read from frames (..., 3, H, W) -> bool (..., grid, grid) indexed
    [y, x]: the ball colour's weights in the cell add up to at least 1/8 of the cell's pixels (a
    ball's come to about 0.3)."""
    w = colour_weights(video, AGENT_BALL)
    h, wd = w.shape[-2:]
    per_cell = w.unflatten(-1, (grid, wd // grid)).unflatten(-3, (grid, h // grid)).sum((-3, -1))
    return per_cell >= 0.125 * (h // grid) * (wd // grid)


def position_error(pred_video, cells, grid=AGENT_GRID):
    """Per frame: distance in cells between the agent read from pred_video (..., T, 3, H, W) and
    its true cells (..., T, 2); a lost agent counts as `grid` cells, more than any distance in the
    room. -> (error (..., T), exact-cell hit (..., T) as 0/1)."""
    pos = agent_cells(pred_video, grid)
    err = (pos - cells.float()).norm(dim=-1)
    hit = (pos.round() == cells.float()).all(-1).float()
    lost = pos.isnan().any(-1)
    return torch.where(lost, float(grid), err), torch.where(lost, 0.0, hit)


class Agent(_Synthetic):
    """A controllable agent in a room (AGENT_GRID cells a side): items {video, actions, states,
    events}; actions (T,) int64 index ACTIONS, actions[t] acts after frame t; states (T, 4, 2)
    int64 cells (x, y) of the agent and up to 3 balls (-1 rows: no such ball); events (T,) index
    EVENTS, the outcome of actions[t] (seen in frame t + 1)."""

    def __init__(self, num_samples, resolution=64, num_frames=16, seed=0, split="train"):
        super().__init__(num_samples, resolution, num_frames, seed, split)
        if resolution % AGENT_GRID:
            raise ValueError(
                f"resolution {resolution} does not divide into the agent's {AGENT_GRID}x"
                f"{AGENT_GRID} cells: use a multiple of {AGENT_GRID}, e.g. 32 or 64"
            )

    def room(self, i):
        """Clip i's room at frame 0, and the rng its policy continues from."""
        rng = self.rng(i)
        return agent_layout(rng), rng

    def replay(self, room, actions):
        """Step room (in place) through actions -> {video, actions, states, events}: frame 0 is
        the room as given, frame t + 1 follows actions[t]; the last action is applied too."""
        cells = [room.cells()]
        events = []
        for a in actions:
            events.append(room.step(int(a)))
            cells.append(room.cells())
        cells = np.stack(cells)
        states = np.full((len(cells), 1 + AGENT_MAX_BALLS, 2), -1, np.int64)
        states[:, : cells.shape[1]] = cells
        return {
            "video": render_agent(room.walls, cells[:-1], self.res),
            "actions": torch.as_tensor(np.asarray(actions, np.int64)),
            "states": torch.from_numpy(states[:-1]),
            "events": torch.tensor(events, dtype=torch.int64),
        }

    def make(self, rng):
        room = agent_layout(rng)
        sim = room.copy()  # the policy reads the room as it moves
        policy = agent_policy(rng, sim)
        actions = []
        for _ in range(self.t):
            actions.append(next(policy))
            sim.step(actions[-1])
        return self.replay(room, actions)


# ----------------------------------------------------------------------------- Moving MNIST
_DIGIT_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmti10.ttf",
    "cmtt10.ttf",
)
# held out: test digits never share a typeface with training digits
_TEST_FONTS = (
    "DejaVuSans-Oblique.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSerif.ttf",
    "STIXGeneralItalic.ttf",
    "cmss10.ttf",
)


def _draw_glyph(rng, font, char):
    """The glyph on a 96x96 canvas with random stroke width, rotation, shear and width."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (96, 96))
    stroke = int(rng.integers(0, 4))
    ImageDraw.Draw(img).text(
        (48, 48), char, fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255
    )
    rot = np.deg2rad(rng.uniform(-15, 15))
    shear = rng.uniform(-0.3, 0.3)
    sx = rng.uniform(0.8, 1.2)
    a = [[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]] @ np.array(
        [[sx, shear], [0, 1]]
    )
    inv = np.linalg.inv(a)  # PIL maps output pixels back to input pixels
    off = 48 - inv @ [48, 48]
    return img.transform(
        img.size,
        Image.Transform.AFFINE,
        (*inv[0], off[0], *inv[1], off[1]),
        Image.Resampling.BILINEAR,
    )


def _glyph_digit(rng, font, char):
    """A glyph with random stroke width, rotation, shear and width, fitted like MNIST: ~20 px
    tall in a 28x28 box, centred by mass."""
    from PIL import Image

    img = _draw_glyph(rng, font, char)
    img = img.crop(img.getbbox())
    scale = rng.uniform(17, 21) / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    g = np.asarray(img.resize(size, Image.Resampling.LANCZOS))
    com = (np.indices(g.shape) * g.astype(np.float32)).sum((1, 2)) / max(g.sum(), 1)
    oy = int(np.clip(round(13.5 - com[0] + rng.uniform(-1, 1)), 0, 28 - g.shape[0]))
    ox = int(np.clip(round(13.5 - com[1] + rng.uniform(-1, 1)), 0, 28 - g.shape[1]))
    out = np.zeros((28, 28), np.uint8)
    out[oy : oy + g.shape[0], ox : ox + g.shape[1]] = g
    return out


def font_digits(split="train", num=None):
    """(num, 28, 28) uint8 digits drawn from matplotlib's bundled fonts (no download). Training
    digits use the training typefaces; val and test digits the held-out ones (_TEST_FONTS), each
    with its own jitter draws, so no split shares a glyph with another."""
    import matplotlib
    from PIL import ImageFont

    root = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    train = _need(split, SPLITS, "split") == "train"
    fonts = [
        ImageFont.truetype(os.path.join(root, f), 56)
        for f in _DIGIT_FONTS
        if (f in _TEST_FONTS) != train and os.path.exists(os.path.join(root, f))
    ]
    rng = np.random.default_rng([20150, {"train": 1, "val": 2, "test": 0}[split]])
    num = num or (1500 if train else 500)
    return np.stack([_glyph_digit(rng, _pick(rng, fonts), str(k % 10)) for k in range(num)])


def mnist_digits(path, split="train"):
    """Real MNIST digits of a split: the official training images for "train"; the official test
    images (t10k) for "val" (even positions) and "test" (odd positions), so no digit image is in
    two splits."""
    if _need(split, SPLITS, "split") == "train":
        return load_mnist_images(path, train=True)
    return load_mnist_images(path, train=False)[split == "test" :: 2]


@functools.lru_cache(maxsize=8)
def digit_pool(split="train", mnist_path=None, digit_size=28):
    """The digit images Moving MNIST draws from, built once per process; the train, val and test
    pools are disjoint (held-out fonts and jitter draws, or MNIST's own train/test files)."""
    x = font_digits(split) if mnist_path is None else mnist_digits(mnist_path, split)
    if x.shape[1:] != (digit_size, digit_size):
        size = (digit_size, digit_size)
        x = F.interpolate(
            torch.from_numpy(x)[:, None].float(), size=size, mode="bilinear", antialias=True
        )
        x = x[:, 0].round().clamp(0, 255).byte().numpy()
    return x


def mnist_trajectory(rng, num_digits, t, step=0.1):
    """The original generator's motion: unit-square top-left positions, a constant step along a
    uniform angle, position updated first, then each coordinate clamped to [0, 1] with its velocity
    flipped. Returns positions and velocities after each step, both (T, n, 2) as (x, y)."""
    pos = rng.random((num_digits, 2))
    theta = rng.random(num_digits) * 2 * np.pi
    vel = np.stack([np.cos(theta), np.sin(theta)], 1) * step
    ps = np.empty((t, num_digits, 2))
    vs = np.empty((t, num_digits, 2))
    for i in range(t):
        pos = pos + vel
        vel = np.where((pos <= 0) | (pos >= 1), -vel, vel)
        pos = np.clip(pos, 0, 1)
        ps[i] = pos
        vs[i] = vel
    return ps, vs


class MovingMNIST(_Synthetic):
    """Bouncing digits: {"video": (T, 1, res, res), "states": (T, num_digits, 4) box centres}."""

    channels = 1

    def __init__(
        self,
        num_samples,
        sequence_length=20,
        resolution=64,
        num_digits=2,
        digit_size=28,
        canvas_size=64,
        max_velocity=0.1,
        train=True,
        seed=0,
        mnist_path=None,
        split=None,
    ):
        split = split or ("train" if train else "test")  # val and test digits are held out
        super().__init__(num_samples, resolution, sequence_length, seed, split)
        if canvas_size <= digit_size:
            raise ValueError(
                f"canvas_size {canvas_size} must be larger than digit_size {digit_size}"
            )
        self.k = num_digits
        self.ds = digit_size
        self.canvas = canvas_size
        self.step = max_velocity
        self.path = None if mnist_path is None else os.path.abspath(mnist_path)

    def make(self, rng):
        c = self.canvas
        ds = self.ds
        pool = digit_pool(SPLITS[self.split_id], self.path, ds)
        pos, vel = mnist_trajectory(rng, self.k, self.t, self.step)
        digits = pool[rng.integers(len(pool), size=self.k)]
        tl = (pos * (c - ds)).astype(np.int32)
        frames = np.zeros((self.t, c, c), np.uint8)
        for f in range(self.t):
            for k in range(self.k):  # max compositing: overlapping digits pass through each other
                sl = frames[f, tl[f, k, 1] : tl[f, k, 1] + ds, tl[f, k, 0] : tl[f, k, 0] + ds]
                np.maximum(sl, digits[k], out=sl)
        video = torch.from_numpy(frames)[:, None].float() / 255
        if self.res != c:
            video = F.interpolate(
                video, size=(self.res, self.res), mode="bilinear", antialias=True
            ).clamp(0, 1)
        states = np.concatenate([tl + ds / 2, vel * (c - ds)], -1) * (self.res / c)
        return {"video": video, "states": torch.from_numpy(states.astype(np.float32))}


def create_moving_mnist_dataset(
    output_file,
    num_samples=1000,
    sequence_length=20,
    resolution=64,
    num_digits=2,
    seed=0,
    train=True,
    mnist_path=None,
):
    """Write N Moving MNIST sequences as uint8 (N, T, 1, H, W) under "videos" (and "states")."""
    ds = MovingMNIST(
        num_samples,
        sequence_length,
        resolution,
        num_digits,
        train=train,
        seed=seed,
        mnist_path=mnist_path,
    )
    items = [ds[i] for i in range(num_samples)]
    videos = to_uint8(torch.stack([it["video"] for it in items]))
    states = torch.stack([it["states"] for it in items]).numpy()
    np.savez_compressed(output_file, videos=videos, states=states)
    return output_file


class MovingMNISTDataset(MovingMNIST):
    """The constructor of the Moving MNIST loader that VideoGPT users know, on this generator:
    10 * videos_per_digit clips of the train or test split. Items are {"video": (T, 1, res, res),
    "states"}: time first, as every data set here (that loader gives (C, T, H, W)). max_velocity is
    the step per frame as a fraction of a digit's free range, canvas_size - digit_size (0.1: the
    original rules); frames are drawn at canvas_size and scaled to resolution."""

    def __init__(
        self,
        sequence_length=16,
        train=True,
        resolution=64,
        num_digits=2,
        digit_size=28,
        canvas_size=64,
        max_velocity=0.1,
        videos_per_digit=1000,
        seed=42,
        mnist_path=None,
    ):
        super().__init__(
            10 * videos_per_digit,
            sequence_length,
            resolution,
            num_digits,
            digit_size,
            canvas_size,
            max_velocity,
            train=train,
            seed=seed,
            mnist_path=mnist_path,
        )


# ----------------------------------------------------------------------------- your own videos
VIDEO_EXTS = (".mp4", ".gif", ".webm", ".avi", ".mov", ".mkv")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")


def _frame_files(folder):
    return [
        os.path.join(folder, f)
        for f in sorted(os.listdir(folder))
        if f.lower().endswith(IMAGE_EXTS)
    ]


def list_videos(root):
    if not os.path.isdir(root):
        raise FileNotFoundError(f"video folder {root} does not exist")
    paths = [os.path.join(root, n) for n in sorted(os.listdir(root))]
    found = [
        p for p in paths if p.lower().endswith(VIDEO_EXTS) or (os.path.isdir(p) and _frame_files(p))
    ]
    if not found:
        raise ValueError(
            f"no videos in {root}: expected {'/'.join(VIDEO_EXTS)} files "
            "or folders of .png/.jpg frames"
        )
    return found


def split_files(paths, split):
    """~80/10/10 by a hash of each file name (stable across machines); with >= 3 files every
    split gets at least one, with fewer only "train" exists (all files)."""
    groups = {s: [] for s in SPLITS}
    for p in paths:
        b = int(hashlib.md5(os.path.basename(p).encode()).hexdigest(), 16) % 10
        groups["train" if b < 8 else "val" if b == 8 else "test"].append(p)
    if len(paths) < 3:
        if split != "train":
            raise ValueError(
                f"only {len(paths)} video(s): a {split} split needs at least 3 files "
                "(splits are by file)"
            )
        return list(paths)
    for s in ("val", "test", "train"):  # top up empty splits from the largest one
        if not groups[s]:
            groups[s].append(groups[max(groups, key=lambda k: len(groups[k]))].pop())
    return groups[split]


def _to_rgb(frame):
    """Grey (H, W) or (H, W, 1), RGB, or RGBA -> (H, W, 3)."""
    if frame.ndim == 2:
        return np.repeat(frame[..., None], 3, -1)
    if frame.shape[-1] == 1:
        return np.repeat(frame, 3, -1)
    return frame[..., :3]


def _decode(iio, path):
    """All frames of a video file or frame folder as uint8 (T, 3, H, W)."""
    if os.path.isdir(path):
        frames = [iio.imread(f) for f in _frame_files(path)]
    else:
        with iio.get_reader(path) as reader:
            frames = [np.asarray(f) for f in reader]
    return torch.from_numpy(np.stack([_to_rgb(f) for f in frames])).permute(0, 3, 1, 2)


def read_video(path, resolution):
    """Decode a video file or frame folder to uint8 (T, 3, res, res): RGB, centre-cropped square."""
    import imageio.v2 as iio

    try:
        x = _decode(iio, path)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot read video {path}: {reason}") from None
    h, w = x.shape[-2:]
    s = min(h, w)
    top = (h - s) // 2
    left = (w - s) // 2
    x = x[..., top : top + s, left : left + s].float()
    x = F.interpolate(
        x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
    )
    return x.round().clamp(0, 255).byte()


def actions_file(path):
    """The actions file of a video file or frame folder: <stem>.actions.txt or <stem>.actions.npz
    beside it, or None."""
    stem = os.path.splitext(os.path.normpath(path))[0] if os.path.isfile(path) else path
    found = [stem + ext for ext in (".actions.txt", ".actions.npz") if os.path.isfile(stem + ext)]
    return found[0] if found else None


def _action_id(word, file, line):
    """One action of an actions file: an id 0-4, a name of ACTIONS, or -1 / unknown."""
    word = word.strip().lower()
    if word in ACTIONS:
        return ACTIONS.index(word)
    if word == "unknown" or re.fullmatch(r"-?\d+", word) and -1 <= int(word) < len(ACTIONS):
        return -1 if word == "unknown" else int(word)
    raise ValueError(
        f"{file} line {line}: unknown action {word!r}; use an id 0-{len(ACTIONS) - 1}, a name "
        f"({', '.join(ACTIONS)}) or -1 for unknown"
    )


def read_actions(file, num_frames):
    """The actions (num_frames,) int64 of a video of num_frames frames from its actions file: one
    per frame (actions[t] acts after frame t), or one fewer (the last frame's is unused, -1)."""
    if file.endswith(".npz"):
        try:
            with np.load(file) as z:
                values = z["actions"]
        except Exception as e:
            raise ValueError(f"cannot read {file}: {e} (it needs an int array 'actions')") from None
        if values.ndim != 1 or values.dtype.kind not in "iu":
            raise ValueError(f"{file}: 'actions' must be a 1-D int array, got {values.dtype}")
        words = [str(v) for v in values]
    else:
        with open(file) as f:
            words = [w for w in f.read().splitlines() if w.strip()]
    ids = [_action_id(w, file, k + 1) for k, w in enumerate(words)]
    if len(ids) not in (num_frames, num_frames - 1):
        raise ValueError(
            f"{file} has {len(ids)} actions for a video of {num_frames} frames: give one per frame "
            f"({num_frames}, or {num_frames - 1}: the last frame's is unused)"
        )
    return torch.tensor(ids + [-1] * (num_frames - len(ids)), dtype=torch.int64)


class VideoFolder(Dataset):
    """Windows of num_frames (every `stride` frames) from a folder of videos, split by file. When
    any video has an actions file (actions_file), every one must, and items hold their "actions"
    (-1: unknown)."""

    channels = 3

    def __init__(
        self, root, num_frames=16, resolution=64, stride=None, split="train", num_samples=None
    ):
        _check_size(resolution, num_frames)
        self.files = split_files(list_videos(root), _need(split, SPLITS, "split"))
        self.clips = [read_video(p, resolution) for p in self.files]  # decoded once, uint8
        self.actions = None
        if any(actions_file(p) for p in list_videos(root)):
            self.actions = [self._actions(p, len(c)) for p, c in zip(self.files, self.clips)]
        self.t = num_frames
        step = stride or num_frames
        windows = [
            (k, s)
            for k, c in enumerate(self.clips)
            for s in range(0, len(c) - num_frames + 1, step)
        ]
        self.index = windows[:num_samples]
        if not self.index:
            raise ValueError(
                f"the {split} videos in {root} have at most {max(map(len, self.clips))} frames; "
                f"num_frames={num_frames} is too many"
            )

    def __len__(self):
        return len(self.index)

    @staticmethod
    def _actions(path, num_frames):
        file = actions_file(path)
        if file is None:
            stem = os.path.splitext(os.path.normpath(path))[0]
            raise ValueError(
                f"{path} has no actions file: other videos of its folder have one; add "
                f"{stem}.actions.txt (one action per frame) or remove the others"
            )
        return read_actions(file, num_frames)

    def __getitem__(self, i):
        k, s = self.index[i]
        item = {"video": self.clips[k][s : s + self.t].float() / 255}
        if self.actions is not None:
            item["actions"] = self.actions[k][s : s + self.t]
        return item


# ----------------------------------------------------------------------------- .npz / .npy files
def load_videos_file(path):
    """uint8 videos (N, T, C, H, W) (memory-mapped for .npy) and all arrays, from an .npz with
    "videos" (as the CLI writes) or the standard time-first Moving MNIST .npy (20, N, 64, 64)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"video file {path} not found (expected a .npz from toy_data.py --out or "
            "mnist_test_seq.npy)"
        )
    try:
        if path.endswith(".npy"):  # memory-mapped: the Moving MNIST test file is 800 MB
            arrays = {"videos": np.load(path, mmap_mode="r")}
        else:
            with np.load(path) as f:
                arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    v = arrays.get("videos")
    if v is None or v.ndim not in (4, 5):
        raise ValueError(
            f"{path}: expected 'videos' (N, T, C, H, W) in an .npz or a time first (20, N, 64, 64) "
            f".npy, found {[(k, a.shape) for k, a in arrays.items()]}"
        )
    if v.ndim == 4:  # grey videos: time first in the Moving MNIST .npy
        v = (v.transpose(1, 0, 2, 3) if path.endswith(".npy") else v)[:, :, None]
    return v, arrays


def load_moving_mnist_test(path, uint8=False):
    """The standard test file mnist_test_seq.npy (uint8 (20, N, 64, 64), time first) as
    (N, 20, 1, 64, 64), float in [0, 1] or uint8."""
    v = torch.from_numpy(np.ascontiguousarray(load_videos_file(path)[0]))
    return v if uint8 else v.float() / 255


def held_out_split(path, arrays):
    """The one split a file may serve, or None for an ordinary file (split by position): "test"
    for the standard test layout (a time-first (T, N, H, W) .npy such as mnist_test_seq.npy), or
    "val" / "test" where an .npz records it (toy_data.py --split val/test writes it)."""
    if path.endswith(".npy") and arrays["videos"].ndim == 4:
        return "test"
    recorded = str(arrays["split"]) if "split" in arrays else None
    return recorded if recorded in ("val", "test") else None


def position_range(n, split):
    """Where a split lies in an ordinary file of n videos: the first 80% train, the next 10% val,
    the last 10% test (at least one video each from n = 3; with fewer, train only). Blocks, not
    every tenth video: neighbouring videos of a file are often windows of one recording."""
    if n < 3:
        if split != "train":
            raise ValueError(
                f"only {n} video(s) in the file: a {split} split needs at least 3 (splits are by "
                "position: 80/10/10)"
            )
        return 0, n
    k = max(1, n // 10)
    return {"train": (0, n - 2 * k), "val": (n - 2 * k, n - k), "test": (n - k, n)}[split]


def _file_range(path, arrays, n, split, whole):
    """(start, stop) of a split's videos in a file; whole: the file is the split's own (a folder's
    train.npz, val.npz, test.npz). Stops with one line where the file belongs to another split."""
    held = held_out_split(path, arrays)
    recorded = str(arrays["split"]) if "split" in arrays else None
    if whole and recorded not in (None, split):
        raise ValueError(
            f"{path} holds {recorded} videos (it records split {recorded!r}), so it cannot be the "
            f"{split} file; write it with `python toy_data.py --split {split}`"
        )
    if held and not whole and held != split:
        why = f"it records split {held!r}"
        if recorded != held:
            why = "time-first (T, N, H, W) like the standard test file mnist_test_seq.npy"
        raise ValueError(
            f"{path} is a {held} set ({why}): it may serve as {held} data only, never as {split} "
            "data; train on other data (e.g. generated --data moving_mnist) and evaluate on it"
        )
    return (0, n) if whole or held else position_range(n, split)


class NpzVideos(Dataset):
    """Videos of a file load_videos_file reads: the first num_frames frames, resized to resolution,
    plus "prompt" / "states" when the file has them. split None: every video of the file; else the
    split's videos (_file_range: a block of an ordinary file, all of a held-out file or, with
    whole, all of a split's own file)."""

    def __init__(
        self, path, num_frames=None, resolution=None, num_samples=None, split=None, whole=False
    ):
        self.videos, arrays = load_videos_file(path)
        self.prompts = arrays.get("prompts")
        self.states = arrays.get("states")
        self.t = num_frames or self.videos.shape[1]
        self.res = resolution
        self.channels = self.videos.shape[2]
        _check_size(resolution or 8, self.t)
        if self.t > self.videos.shape[1]:
            raise ValueError(
                f"{path} has {self.videos.shape[1]} frames per video; "
                f"num_frames={self.t} is too many"
            )
        self.start, stop = 0, len(self.videos)
        if split is not None:
            _need(split, SPLITS, "split")
            self.start, stop = _file_range(path, arrays, len(self.videos), split, whole)
        self.n = min(stop - self.start, num_samples or stop)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} videos")
        j = self.start + i % self.n
        v = torch.from_numpy(np.array(self.videos[j, : self.t]))
        v = v.float() / 255 if v.dtype == torch.uint8 else v.float()
        if self.res and v.shape[-2:] != (self.res, self.res):
            with _one_thread():
                v = F.interpolate(
                    v, size=(self.res, self.res), mode="bilinear", antialias=True
                ).clamp(0, 1)
        item = {"video": v}
        if self.prompts is not None:
            item["prompt"] = str(self.prompts[j])
        if self.states is not None:
            item["states"] = torch.from_numpy(np.array(self.states[j, : self.t]))
        return item


# ----------------------------------------------------------------------------- MNIST IDX files
def _read_idx(path):
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"cannot read IDX file {path}: {e}") from None
    if len(data) < 4 or data[:3] != b"\0\0\x08" or len(data) < 4 + 4 * data[3]:
        raise ValueError(
            f"{path} is not a uint8 IDX file (bad header); expected MNIST's train-images-idx3-ubyte"
        )
    header = 4 + 4 * data[3]
    dims = struct.unpack(f">{data[3]}I", data[4:header])
    body = data[header:]
    if len(body) != math.prod(dims):
        raise ValueError(
            f"{path} is truncated or corrupt: header says {dims}, found {len(body)} bytes of data"
        )
    return np.frombuffer(body, np.uint8).reshape(dims)


def _npz_images(path, key):
    try:
        with np.load(path) as z:
            return z[key]
    except KeyError:
        raise ValueError(f"{path} has no array {key!r}; it needs x_train and x_test") from None
    except Exception as e:
        raise ValueError(f"cannot read {path} as .npz: {e}") from None


def load_mnist_images(path, train=True):
    """(N, H, W) uint8 images from an MNIST-format folder of IDX files (.gz or raw), one IDX
    file, or an .npz holding x_train / x_test (Fashion-MNIST works the same way)."""
    stem = "train-images-idx3-ubyte" if train else "t10k-images-idx3-ubyte"
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"MNIST path {path} does not exist; give a folder with {stem}(.gz) or an .npz "
            "with x_train/x_test"
        )
    if os.path.isdir(path):
        found = [
            os.path.join(path, stem + e)
            for e in (".gz", "")
            if os.path.exists(os.path.join(path, stem + e))
        ]
        if not found:
            raise FileNotFoundError(f"no {stem} or {stem}.gz in {path}")
        path = found[0]
    elif not path.endswith(".npz") and (not train or "t10k" in os.path.basename(path)):
        # one IDX file holds one of MNIST's splits: read for both, it would put the same digits
        # in training and held-out clips
        raise ValueError(
            f"{path} is one IDX file, which holds one MNIST split; pass the folder holding both "
            "train-images-idx3-ubyte and t10k-images-idx3-ubyte (held-out digits come from t10k)"
        )
    if path.endswith(".npz"):
        x = _npz_images(path, "x_train" if train else "x_test")
    else:
        x = _read_idx(path)
    if x.ndim != 3 or len(x) == 0:
        raise ValueError(f"{path}: expected images (N, H, W), got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    return np.clip(x * (255 if x.max() <= 1 else 1), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- factory and clips
_PHYSICS = {
    "bouncing_balls": BouncingBalls,
    "pendulum": Pendulum,
    "falling": FallingObjects,
    "projectile": Projectile,
}


FILE_KINDS = ("folder", "npz", "moving_mnist")  # the kinds that read --data-dir
_MNIST_STEMS = ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")


def implied_kind(data_dir):
    """The kind of data a --data-dir holds: "moving_mnist" for MNIST IDX files (a folder holding
    train-images-idx3-ubyte[.gz], such a file, or an .npz with x_train), "npz" for an .npz / .npy
    of videos or a folder of train.npz / val.npz / test.npz, "folder" for a folder of videos."""
    if not os.path.exists(data_dir):
        raise FileNotFoundError(f"--data-dir {data_dir} does not exist")
    name = os.path.basename(os.path.normpath(data_dir))
    if os.path.isdir(data_dir):
        names = os.listdir(data_dir)
        if any(n.startswith(_MNIST_STEMS) for n in names):
            return "moving_mnist"
        if any(f"{s}.npz" in names for s in SPLITS):
            return "npz"
        list_videos(data_dir)  # no videos: one line that says what it expected
        return "folder"
    if name.endswith(".npz"):
        try:
            with np.load(data_dir) as z:
                return "moving_mnist" if "x_train" in z.files else "npz"
        except Exception as e:
            raise ValueError(f"cannot read {data_dir} as .npz: {e}") from None
    if name.endswith(".npy"):
        return "npz"
    if name.startswith(_MNIST_STEMS):
        return "moving_mnist"
    raise ValueError(
        f"cannot tell what --data-dir {data_dir} holds: pass a folder of videos, an .npz/.npy file "
        "of videos, or a folder of MNIST IDX files (train-images-idx3-ubyte[.gz])"
    )


def data_kind(kind, data_dir=None, default=None):
    """The kind a run reads. A --data-dir implies its kind (implied_kind) when --data is left at
    the script's `default`; a --data-dir given with another generated kind, which reads no files,
    is an error: never silently ignored."""
    _need(kind, KINDS, "data kind")
    if data_dir is None or kind in FILE_KINDS:
        return kind
    if kind == default:
        return implied_kind(data_dir)
    raise ValueError(
        f"--data {kind} is generated and reads no --data-dir: drop --data to read {data_dir} "
        "(it implies its kind), or drop --data-dir"
    )


def make_dataset(
    kind, num_samples, resolution=64, num_frames=16, seed=0, split="train", data_dir=None
):
    """The data set every train script uses. "folder": data_dir is a folder of videos (split by
    file name); "npz": a folder holding train.npz / val.npz / test.npz, or one file, split by
    position unless it is a held-out file (held_out_split); "moving_mnist": data_dir optionally
    holds real MNIST files. No two splits share a video (or, for Moving MNIST, a digit image)."""
    _need(kind, KINDS, "data kind")
    _need(split, SPLITS, "split")
    if kind == "shapes":
        return ToyDataset(num_samples, resolution, resolution, num_frames, seed, split)
    if kind in _PHYSICS:
        return _PHYSICS[kind](num_samples, resolution, num_frames, seed, split)
    if kind == "moving_mnist":
        return MovingMNIST(
            num_samples, num_frames, resolution, seed=seed, split=split, mnist_path=data_dir
        )
    if kind == "smoke":
        return Smoke(num_samples, resolution, num_frames, seed, split)
    if kind == "agent":
        return Agent(num_samples, resolution, num_frames, seed, split)
    if data_dir is None:
        raise ValueError(
            f"data kind {kind!r} needs data_dir: a folder of videos (folder) or a .npz file (npz)"
        )
    if kind == "folder":
        return VideoFolder(data_dir, num_frames, resolution, split=split, num_samples=num_samples)
    whole = os.path.isdir(data_dir)
    path = os.path.join(data_dir, f"{split}.npz") if whole else data_dir
    return NpzVideos(path, num_frames, resolution, num_samples, split, whole)


def _any_split_file(data_dir):
    """The file itself, or the first of a folder's train.npz / val.npz / test.npz."""
    if not os.path.isdir(data_dir):
        return data_dir
    found = [os.path.join(data_dir, f"{s}.npz") for s in SPLITS]
    return next((f for f in found if os.path.isfile(f)), found[0])


def channels_of(kind, data_dir=None):
    """Channels of a kind's videos ("npz" needs data_dir to look inside the file)."""
    if _need(kind, KINDS, "data kind") == "npz":
        if data_dir is None:
            raise ValueError(
                "channels_of('npz') needs data_dir, the .npz file, to read its channel count"
            )
        return NpzVideos(_any_split_file(data_dir)).channels
    return 1 if kind == "moving_mnist" else 3


def collate(batch):
    """DataLoader collate_fn: stacks tensors, keeps the rest (prompts, attrs with None) as lists."""
    out = {}
    for k in batch[0]:
        values = [b[k] for b in batch]
        out[k] = torch.stack(values) if torch.is_tensor(batch[0][k]) else values
    return out


def _time_dim(video, dim):
    if dim is not None:
        return dim
    return 1 if video.ndim == 5 else 0


def split_context_target(video, context, dim=None):
    """First `context` frames and the rest, along T of (T, ...) or of (B, T, C, H, W)."""
    d = _time_dim(video, dim)
    t = video.shape[d]
    if not 0 < context < t:
        raise ValueError(f"context={context} must be between 1 and {t - 1} for a {t}-frame video")
    return video.narrow(d, 0, context), video.narrow(d, context, t - context)


def sliding_windows(video, length, stride=1):
    """(T, C, H, W) -> (N, length, C, H, W) windows every `stride` frames (a batch is flattened)."""
    if video.ndim == 5:
        return torch.cat([sliding_windows(v, length, stride) for v in video])
    if not 1 <= length <= video.shape[0] or stride < 1:
        raise ValueError(
            f"window length {length} / stride {stride} invalid for a {video.shape[0]}-frame video"
        )
    return video.unfold(0, length, stride).permute(0, 4, 1, 2, 3)  # unfold puts the window last


def random_window(video, length, generator=None):
    """A random run of `length` frames (the same start for every video of a batch)."""
    d = _time_dim(video, None)
    if not 1 <= length <= video.shape[d]:
        raise ValueError(f"window length {length} invalid for a {video.shape[d]}-frame video")
    start = int(torch.randint(0, video.shape[d] - length + 1, (1,), generator=generator))
    return video.narrow(d, start, length)


def to_uint8(videos):
    return (videos.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


# ----------------------------------------------------------------------------- CLI
def bench(resolution=64, num_frames=16, seconds=1.0):
    """frames/s of every synthetic kind on one thread (CPU-time figures stay fair on a busy
    machine)."""
    torch.set_num_threads(1)
    for kind in KINDS[:8]:
        ds = make_dataset(kind, 10**6, resolution, num_frames)
        ds[0]  # builds lazy caches (digit pools)
        n = 0
        t0 = time.perf_counter()
        c0 = time.process_time()
        while time.perf_counter() - t0 < seconds or n < 3:
            n += 1
            ds[n]
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        print(
            f"{kind:15s} {n * num_frames / wall:8.0f} frames/s wall "
            f"{n * num_frames / cpu:8.0f} frames/s CPU "
            f"({resolution}x{resolution}, {num_frames} frames, 1 thread)"
        )


def _parser():
    p = argparse.ArgumentParser(
        description="Write a toy video data set as uint8 .npz, preview it, or benchmark it."
    )
    p.add_argument(
        "command",
        nargs="?",
        default="generate",
        choices=["generate", "bench"],
        help="generate (default): write --out and/or --preview; "
        "bench: frames/s of every synthetic kind on one thread",
    )
    p.add_argument(
        "--kind",
        default="shapes",
        help=f"one of: {', '.join(KINDS)}; left out with --data-dir: the kind the data-dir holds",
    )
    p.add_argument("--num", type=int, default=64, help="number of videos")
    p.add_argument(
        "--out",
        help="output .npz: uint8 'videos' (N, T, C, H, W), plus 'prompts' or 'states' and the "
        "split; or .npy: grey videos in the standard test layout (T, N, H, W), as "
        "mnist_test_seq.npy, which serves as test data only",
    )
    p.add_argument("--preview", help="animated GIF grid of the first 8 videos")
    p.add_argument(
        "--resolution", type=int, default=64, help="frame height and width in pixels (at least 8)"
    )
    p.add_argument("--frames", type=int, default=16, help="frames per video")
    p.add_argument(
        "--seed", type=int, default=0, help="data seed: sample i of a seed and split never changes"
    )
    p.add_argument(
        "--split", default="train", choices=SPLITS, help="which of the disjoint splits to draw from"
    )
    p.add_argument(
        "--data-dir",
        help="folder of videos (folder), .npz/.npy (npz), or MNIST files (moving_mnist)",
    )
    return p


def _write_npy(path, videos, split):
    """The standard test layout: uint8 (T, N, H, W), time first, as mnist_test_seq.npy."""
    if videos.shape[2] != 1 or split != "test":
        raise SystemExit(
            "error: the time-first .npy layout (that of mnist_test_seq.npy) is for grey test "
            f"videos, which serve as test data only; these are {videos.shape[2]}-channel "
            f"{split} videos: write an .npz, or pass --split test"
        )
    np.save(path, videos[:, :, 0].transpose(1, 0, 2, 3))
    t, n = videos.shape[1], videos.shape[0]
    print(f"wrote {path}: uint8 (T, N, H, W) = {(t, n, *videos.shape[-2:])}, time first")


def _write_npz(path, items, videos, split):
    arrays = {"videos": videos, "split": np.array(split)}
    if "prompt" in items[0]:
        arrays["prompts"] = np.array([it["prompt"] for it in items])
    if "states" in items[0]:
        arrays["states"] = torch.stack([it["states"] for it in items]).numpy()
    if "actions" in items[0]:
        arrays["actions"] = torch.stack([it["actions"] for it in items]).numpy()
    np.savez_compressed(path, **arrays)
    extras = "".join(f", {k}" for k in arrays if k not in ("videos", "split"))
    extras += f" (split {split!r}: it serves as {split} data only)" * (split != "train")
    print(f"wrote {path}: videos {tuple(videos.shape)} uint8" + extras)


def _generate(ds, n):
    """The first n items, their videos as one uint8 (N, T, C, H, W) array, filled as they are
    made (10,000 Moving MNIST clips take 0.8 GB, not 3.3 GB of floats) -> videos, other fields."""
    videos = None
    items = []
    for i in range(n):
        item = ds[i]
        v = to_uint8(item.pop("video"))
        if videos is None:
            videos = np.empty((n, *v.shape), np.uint8)
        videos[i] = v
        items.append(item)
    return videos, items


def main(argv=None):
    p = _parser()
    a = p.parse_args(argv)
    if a.command == "bench":
        return bench(a.resolution, a.frames)
    if not (a.out or a.preview):
        p.error("give --out FILE.npz (or a test .npy) and/or --preview FILE.gif")
    try:
        kind = data_kind(a.kind, a.data_dir, p.get_default("kind"))
        ds = make_dataset(kind, a.num, a.resolution, a.frames, a.seed, a.split, a.data_dir)
        videos, items = _generate(ds, len(ds) if a.out else min(8, len(ds)))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    if a.out and a.out.endswith(".npy"):
        _write_npy(a.out, videos, a.split)
    elif a.out:
        _write_npz(a.out, items, videos, a.split)
    if a.preview:
        import viz  # only here: the data sets themselves need no plotting

        prompts = [it.get("prompt", f"{kind} {i}") for i, it in enumerate(items[:8])]
        viz.save_video_grid(torch.from_numpy(videos[:8]).float() / 255, a.preview, prompts=prompts)
        print(f"wrote {a.preview}")


if __name__ == "__main__":
    main()
