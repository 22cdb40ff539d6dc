"""RIVER: video prediction by sparsely conditioned flow matching in the latents of a frozen VQ-VAE.

Each next frame is generated in the latent space of the first stage (`train_vqvae.py`) by
integrating a learned vector field from noise (t = 0) to data (t = 1). The field sees only three
latent frames: the noisy one x_t, the previous frame (the reference) and ONE earlier frame drawn at
random (the context), plus the index distance from the reference to the context. A fresh context is
drawn at every network evaluation, so over the ODE solve the model sees much of the past, while the
cost of a frame never grows with the history. Generated latents join the history unquantised;
frames are decoded by quantise-then-decode.

Paper: Davtyan, Sameni, Favaro, "Efficient Video Prediction via Sparsely Conditioned Flow Matching"
(RIVER, ICCV 2023); path and objective from Lipman et al., "Flow Matching for Generative Modeling"
(2023). Faithful to the public code: frame sampling, sigma_min 1e-7, closed-form target, MSE, U-ViT
regressor (time token, log-distance MLP, learned row/column positions, long skips, conv head),
fixed-grid RK4 (3/8 rule), warm start, AdamW with warm-up then square-root decay, no guidance, no
EMA. Deviations: latents are normalised per channel with the first stage's statistics of training
clips (z_e std is ~0.4, far from the unit-variance noise), all clips are encoded once up front, the
regressor is small, lr 1e-3 with gradient clipping at 1 for a short CPU schedule, the default ODE
grid has 10 points instead of 100 (CPU), and `--past-horizon` uses max where the public code's min
made it a no-op.

    python train_river.py    # CPU: ~6 min on one core, smoke data; needs `python train_vqvae.py`
    python train_river.py --data shapes --vqvae runs/train_vqvae_shapes
                             # after train_vqvae.py --data shapes --out-dir ...
    python train_river.py --width 384 --heads 8 --batch-size 64 --steps 30000 --ode-steps 100  # GPU
    torchrun --standalone --nproc_per_node=2 train_river.py  # DDP (nccl on CUDA, gloo on CPU)
    python train_river.py --eval-only --warm-start 0.2 --out-dir runs/river_ws02 \\
        --ckpt runs/train_river/ckpt.pt
    python train_river.py --bench --ckpt runs/train_river/ckpt.pt
                             # NFE and s/frame for 5-, 20-, 50-frame rollouts
    python train_river.py --video clip.mp4 --rollout 60  # continue the first --context frames of it
    OMP_NUM_THREADS=1 python train_river.py  # CPU shared with other jobs: far faster than 2 threads

Outputs in --out-dir: ckpt.pt, args.json, metrics.json (model, copy_last and the autoencoded truth
on the same test clips; the flow-matching loss on them, also with the context replaced by the
reference; NFE and time per frame; bench), TensorBoard events (train/{loss,lr}, eval/, perf/,
samples/), samples/ (rollout_*.gif: truth | prediction | error of --rollout frames, context
marked; rollout_latest.png), plots/ (horizon*.png, training_curves.png).
"""

import glob
import hashlib
import json
import math
import os
import random
import shlex
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.tensorboard import SummaryWriter

import metrics
import toy_data
import viz


@dataclass
class Args:
    # run
    steps: int = 1600
    """training steps (one batch per process each)"""
    seed: int = 0
    """random seed: model init, data sets, batch order and sampling noise"""
    out_dir: str = "runs/train_river"
    """folder for ckpt.pt, metrics.json, TensorBoard events, samples/ and plots/"""
    resume: bool = True
    """continue from --ckpt (or out_dir/ckpt.pt) when it exists"""
    eval_only: bool = False
    """evaluate the checkpoint, write metrics.json, samples and plots, then exit"""
    ckpt: str | None = None
    """checkpoint to resume, evaluate, benchmark or sample from; None: out_dir/ckpt.pt"""
    accept_changed_args: bool = False
    """resume even if flags that shape the run (steps, lr, batch size, data, ...) differ from the
    checkpoint's (the schedule then changes mid-run)"""
    bench: bool = False
    """time rollouts of --bench-frames frames with the checkpoint (NFE and seconds per frame),
    add them to metrics.json, exit"""
    video: str | None = None
    """a video file or frame folder: continue its first --context frames for --rollout frames
    into samples/, exit"""
    log_every: int = 50
    """print and log training losses every N steps"""
    eval_every: int = 800
    """held-out evaluation every N steps (and always at the end)"""
    sample_every: int = 800
    """write rollout GIFs every N steps"""
    ckpt_every: int = 400
    """write ckpt.pt every N steps (and at the end and on Ctrl-C)"""
    # system
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto: CUDA if present, else CPU"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """autocast dtype; auto: bf16 on CUDA and bf16-capable CPUs, fp16 + GradScaler on older GPUs,
    else fp32"""
    compile: tyro.conf.DisallowNone[bool | None] = None
    """torch.compile the model; None (unset): on for CUDA, off otherwise"""
    # data
    data: str = "smoke"
    """data kind: smoke, shapes, bouncing_balls, pendulum, falling, projectile, moving_mnist, folder
    or npz (must match the first stage)"""
    data_dir: str | None = None
    """folder of videos (--data folder), .npz file (--data npz) or MNIST files
    (--data moving_mnist); implies its kind when --data is left out"""
    resolution: int = 64
    """frame size in pixels (must match the first stage)"""
    frames: int = 16
    """frames per training clip (>= 3): targets are frames 2..frames-1 of a clip, contexts any
    frame before the previous"""
    context: int = 4
    """observed frames before the prediction starts at evaluation"""
    horizon: int = 12
    """predicted frames at evaluation; the headline metrics average them"""
    rollout: int = 36
    """frames predicted in the rollout GIFs (samples/) and by --video"""
    train_clips: int = 384
    """clips generated and encoded once into the latent cache (split 'train')"""
    eval_clips: int = 32
    """held-out clips of --context + --horizon frames: split 'val' for the evaluations during
    training, split 'test' for the figures in metrics.json"""
    vqvae: str = "runs/train_vqvae"
    """folder of the frozen first stage written by train_vqvae.py (first_stage.json,
    first_stage_{encode,decode}.pt2)"""
    latent_cache: str | None = None
    """folder to keep encoded training latents in, memory-mapped (for big data sets; reused by
    later runs); None: memory only"""
    # model
    width: int = 128
    """transformer width d (RIVER: 768)"""
    heads: int = 4
    """attention heads"""
    depth: int = 2
    """input blocks, and as many output blocks joined to them by long skips (RIVER: 4)"""
    mid_depth: int = 2
    """middle blocks (RIVER: 5)"""
    dropout: float = 0.05
    """dropout in the transformer layers"""
    # optim
    batch_size: int = 32
    """training examples (one target frame each) per batch per process"""
    lr: float = 1e-3
    """peak learning rate (AdamW), after linear warm-up, then decayed with power 0.5 to lr/1000
    (RIVER: 1e-4)"""
    weight_decay: float = 5e-6
    """AdamW weight decay"""
    warmup_steps: int = 100
    """linear learning-rate warm-up steps"""
    grad_clip: float = 1.0
    """clip the gradient norm to this (0: off, as RIVER)"""
    # method
    sigma_min: float = 1e-7
    """noise left at t = 1 by the flow-matching path"""
    solver: Literal["rk4", "euler"] = "rk4"
    """fixed-grid ODE solver: rk4 (the 3/8 rule, 4 evaluations per step, as RIVER) or euler (1)"""
    ode_steps: int = 10
    """points of the time grid from 0 to 1 (RIVER: 100); NFE per frame = 4 * (int((1 - s) * steps)
    - 1) for rk4"""
    warm_start: float = 0.0
    """start the ODE at time s from the noised previous latent instead of from noise at 0
    (fewer NFE)"""
    past_horizon: int | None = None
    """contexts are drawn from the last H frames of the history (H >= 2; 0: all); None: --frames
    - 1, the farthest seen in training"""
    val_draws: int = 8
    """random (frame, t, noise) draws per held-out clip for the validation loss"""
    bench_frames: tuple[int, ...] = (5, 20, 50)
    """rollout lengths timed by --bench"""


# ------------------------------------------------------------------------------------------ model
def time_embedding(t, dim, scale=200.0, max_period=1e4):
    """RIVER's sinusoidal code of 200 t: cos half, then sin half."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = scale * t.float()[:, None] * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], -1)


def transformer_layer(width, heads, dropout):
    """RIVER's block: nn.TransformerEncoderLayer, pre-norm, GELU, FFN 4 d."""
    return nn.TransformerEncoderLayer(
        width, heads, 4 * width, dropout, "gelu", batch_first=True, norm_first=True
    )


class VectorField(nn.Module):
    """RIVER's U-ViT-style regressor over one latent frame. Every latent cell is a token made of the
    channel-concatenated [x_t, reference, context]; learned row/column positions and an MLP of
    log(distance) are added to every cell token; flow time is one extra token in front. Output
    block i first joins the input block output saved i-th from last (long skips), and a conv head
    maps the cell tokens back to the latent grid."""

    def __init__(self, channels=4, grid=8, width=128, heads=4, depth=2, mid_depth=2, dropout=0.05):
        super().__init__()
        self.width = width
        self.inp = nn.Linear(3 * channels, width)
        # DETR-style tables, U(-1, 1)
        self.rows = nn.Parameter(torch.rand(grid, width // 2) * 2 - 1)
        self.cols = nn.Parameter(torch.rand(grid, width - width // 2) * 2 - 1)
        self.dist = nn.Sequential(nn.Linear(1, 256), nn.ReLU(), nn.Linear(256, width))
        self.down = nn.ModuleList(transformer_layer(width, heads, dropout) for _ in range(depth))
        self.mid = nn.ModuleList(transformer_layer(width, heads, dropout) for _ in range(mid_depth))
        self.up = nn.ModuleList(transformer_layer(width, heads, dropout) for _ in range(depth))
        self.skip = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(depth))
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, t, ref, ctx, delta):
        """x_t, reference, context: (B, C, h, w) latents; t: (B,) flow time; delta: (B,) index
        distance >= 1."""
        B, C, H, W = x.shape
        cells = torch.cat([x, ref, ctx], 1).flatten(2).transpose(1, 2)
        tokens = self.inp(cells)  # (B, H*W, d)
        cols = self.cols[None, :W].expand(H, -1, -1)
        rows = self.rows[:H, None].expand(-1, W, -1)
        pos = torch.cat([cols, rows], -1).flatten(0, 1)
        tokens = tokens + pos + self.dist(delta.float().log()[:, None])[:, None]
        time_token = time_embedding(t, self.width)[:, None].to(tokens.dtype)
        h = torch.cat([time_token, tokens], 1)  # H*W + 1 tokens
        skips = []
        for block in self.down:
            h = block(h)
            skips.append(h)
        for block in self.mid:
            h = block(h)
        for block, join in zip(self.up, self.skip):
            h = block(join(torch.cat([h, skips.pop()], -1)))
        h = self.head(h[:, 1:])  # the time token is dropped
        return self.out(h.transpose(1, 2).reshape(B, -1, H, W))


# ----------------------------------------------------------------------------------------- method
def flow_path(z1, eps, t, sigma=1e-7):
    """OT path from noise eps (t = 0) to data z1 (t = 1): x_t = (1 - (1 - sigma) t) eps + t z1, and
    its target field u = z1 - (1 - sigma) eps. The public code divides,
    u = (z1 - (1 - sigma) x_t) / (1 - (1 - sigma) t): the same field, but it loses float32
    precision as t -> 1. -> (x_t, u)"""
    tt = t.view(-1, *[1] * (z1.dim() - 1))
    x_t = (1 - (1 - sigma) * tt) * eps + tt * z1
    return x_t, z1 - (1 - sigma) * eps


def predicted_endpoint(x_t, v, t, sigma=1e-7):
    """One-step estimate of the data point from x_t and a field value v: equals z1 when v is the
    target u."""
    tt = t.view(-1, *[1] * (x_t.dim() - 1))
    return (1 - sigma) * x_t + (1 - (1 - sigma) * tt) * v


def training_indices(n, batch, gen=None):
    """Per batch element of n-frame clips: target tau ~ U{2..n-1}, reference tau - 1, context
    c ~ U{0..tau-2} (strictly before the reference) and the distance delta = (tau - 1) - c >= 1,
    from the reference."""
    tau = torch.randint(2, n, (batch,), generator=gen)
    ctx = (torch.rand(batch, generator=gen) * (tau - 1)).long()
    return tau, ctx, tau - 1 - ctx


def context_indices(length, batch, horizon=0, gen=None):
    """Sampling, history of `length` latents: c ~ U{lo..length-2} per batch element, never the
    newest (the reference), lo = max(0, length - horizon) (the public code's min() let the horizon
    restrict nothing and could give negative indices). -> (c, delta = length - 1 - c)"""
    lo = max(0, length - horizon) if horizon else 0
    c = lo + (torch.rand(batch, generator=gen) * (length - 1 - lo)).long()
    return c, length - 1 - c


def river_inputs(clips, gen=None, sigma=1e-7):
    """One example per latent clip (B, n, C, h, w): frame indices, t ~ U[0, 1) and noise.
    -> regressor inputs (x_t, t, reference, context, delta), target field u, target latent z1."""
    B, n, dev = clips.shape[0], clips.shape[1], clips.device
    tau, ctx, delta = training_indices(n, B, gen)
    t = torch.rand(B, generator=gen)
    eps = torch.randn(clips[:, 0].shape, generator=gen)
    tau, ctx, delta, t, eps = (v.to(dev) for v in (tau, ctx, delta, t, eps))
    rows = torch.arange(B, device=dev)
    z1 = clips[rows, tau]
    x_t, u = flow_path(z1, eps, t, sigma)
    return (x_t, t, clips[rows, tau - 1], clips[rows, ctx], delta), u, z1


def river_loss(model, clips, gen=None, sigma=1e-7, amp=nullcontext(), reduction="mean"):
    """THE LOSS: MSE between the field at river_inputs(clips) and the target field u, in fp32.
    -> (loss, (regressor inputs, u, z1, field v)); validation scores the rest."""
    inputs, u, z1 = river_inputs(clips, gen, sigma)
    with amp:
        v = model(*inputs).float()
    return F.mse_loss(v, u, reduction=reduction), (inputs, u, z1, v)


def time_grid(steps, warm_start=0.0):
    """RIVER's grid linspace(s, 1, int((1 - s) steps)), at least 2 points: a warm start keeps the
    step ~1/steps."""
    n = max(2, int((1 - warm_start) * steps))
    return torch.linspace(warm_start, 1, n, dtype=torch.float64).tolist()


def integrate(f, y, grid, solver="rk4"):
    """Solve dy/dt = f(t, y) over a fixed grid: Euler, or the 4-evaluation RK4 3/8 rule
    (torchdiffeq's fixed-grid 'rk4', which RIVER calls)."""
    for t0, t1 in zip(grid[:-1], grid[1:]):
        dt = t1 - t0
        k1 = f(t0, y)
        if solver == "euler":
            y = y + dt * k1
            continue
        k2 = f(t0 + dt / 3, y + dt * k1 / 3)
        k3 = f(t0 + 2 * dt / 3, y + dt * (k2 - k1 / 3))
        k4 = f(t1, y + dt * (k1 - k2 + k3))
        y = y + dt * (k1 + 3 * (k2 + k3) + k4) / 8
    return y


@torch.no_grad()
def generate(
    model,
    history,
    n_frames,
    steps=10,
    solver="rk4",
    warm_start=0.0,
    past_horizon=0,
    sigma=1e-7,
    gen=None,
    amp=nullcontext(),
):
    """THE SAMPLER. Roll out n_frames latents after history (B, L, C, h, w). Every network
    evaluation gets the newest latent as reference and a fresh random earlier one per element as
    context; a solved latent joins the history as it is (unquantised). One observed frame is
    duplicated so a context exists, as RIVER does on BAIR.
    -> (B, n_frames, C, h, w) fp32 latents, number of network evaluations."""
    B, dev = history.shape[0], history.device
    first = history[:, :1].expand(-1, int(history.shape[1] == 1), -1, -1, -1)
    hist = torch.cat([first, history, history.new_zeros(B, n_frames, *history.shape[2:])], 1)
    # the solver's dtype: fp32, or fp64 if given
    hist = hist.to(torch.promote_types(hist.dtype, torch.float32))
    length = hist.shape[1] - n_frames
    rows = torch.arange(B, device=dev)
    grid = time_grid(steps, warm_start)
    nfe = 0
    for _ in range(n_frames):
        ref = hist[:, length - 1]

        def field(t, y):
            nonlocal nfe
            c, delta = context_indices(length, B, past_horizon, gen)
            nfe += 1
            t = torch.full((B,), t, dtype=hist.dtype, device=dev)
            with amp:
                return model(y, t, ref, hist[rows, c.to(dev)], delta.to(dev)).to(hist.dtype)

        eps = torch.randn(ref.shape, generator=gen).to(dev)
        # warm start: the noised previous latent at time s (pure noise at s = 0)
        y = (1 - (1 - sigma) * grid[0]) * eps + grid[0] * ref
        hist[:, length] = integrate(field, y, grid, solver)
        length += 1
    return hist[:, length - n_frames : length], nfe


def river_lr_at(step, total, peak, warmup):
    """Linear warm-up, then RIVER's polynomial decay with power 0.5 down to peak/1000 (the fenced
    lr_at decays by a cosine to peak/10)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    left = max(0.0, 1 - (step - warmup) / max(1, total - warmup))
    return peak * (1e-3 + (1 - 1e-3) * left**0.5)


# --------------------------------------------------------------------------- first stage and data
def first_stage_command(args, out):
    """The train_vqvae.py command that makes a first stage for these --data/--resolution flags in
    `out`."""
    flags = [
        f"--data {args.data}" * (args.data != "smoke"),
        f"--data-dir {shlex.quote(str(args.data_dir))}" * bool(args.data_dir),
        f"--resolution {args.resolution}" * (args.resolution != 64),
        f"--out-dir {shlex.quote(out)}" * (out != "runs/train_vqvae"),
    ]
    return " ".join(["python train_vqvae.py", *filter(None, flags)])


def first_stage_fits(path, args):
    """Whether path holds first_stage.json for these --data/--resolution flags (and, where its
    args.json says, the same --data-dir)."""
    found = []
    for name in ("first_stage.json", "args.json"):
        try:
            with open(os.path.join(path, name)) as f:
                found.append(json.load(f))
        except (OSError, ValueError):
            found.append({})
    meta, made_with = found
    same_dir = made_with.get("data_dir", args.data_dir) == args.data_dir
    return same_dir and (meta.get("data"), meta.get("resolution")) == (args.data, args.resolution)


def first_stage_advice(args, path=None):
    """How to get a first stage for these flags: make it in path, if given and no run is there
    (train_vqvae.py would resume that run), else in the first free runs/train_vqvae_<data>[_<res>]
    folder, or pass the folder that already holds one."""
    base = f"runs/train_vqvae_{args.data}" + f"_{args.resolution}" * (args.resolution != 64)
    out = path
    k = 1
    while out is None or os.path.exists(os.path.join(out, "ckpt.pt")):
        out = base if k == 1 else f"{base}_{k}"
        if out != path and first_stage_fits(out, args):
            return f"a matching one is in {out}: pass --vqvae {shlex.quote(out)}"
        k += 1
    passing = f" and pass --vqvae {shlex.quote(out)}" if out != path else ""
    return f"make one with `{first_stage_command(args, out)}`{passing}"


def check_data(args, splits):
    """Stop with one line when --resolution or the data cannot work, before the first stage is
    looked at (its errors suggest a train_vqvae.py command, which would fail the same way)."""
    if args.resolution % 8 or args.resolution < 8:
        raise SystemExit(
            f"error: --resolution {args.resolution} is not a positive multiple of 8 (the first "
            "stage's encoder halves it 3 times); use e.g. 64"
        )
    where = {
        "folder": "a folder of videos",
        "npz": "an .npz file or a folder of train.npz, val.npz",
    }
    d = args.data_dir
    if args.data in where and not d:
        raise SystemExit(f"error: --data {args.data} needs --data-dir, {where[args.data]}")
    if args.data == "npz":
        paths = [os.path.join(d, f"{s}.npz") for s in splits] if os.path.isdir(d) else [d]
        for path in paths:
            if not os.path.isfile(path):
                raise SystemExit(f"error: --data npz reads {where['npz']}; {path} does not exist")
    try:
        if args.data == "folder":
            for split in splits:
                toy_data.split_files(toy_data.list_videos(d), split)
        if args.data == "moving_mnist" and d:  # reads the digits (cached for the run)
            toy_data.make_dataset(args.data, 1, args.resolution, 1, args.seed, "val", d)[0]
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: --data {args.data}: {e}")


def load_first_stage(path, args):
    """The frozen first stage from train_vqvae.py. -> (encode, decode: fp32 programs, frozen; its
    per-channel latent mean and std), meta, fingerprint."""
    files = [os.path.join(path, f"first_stage{s}") for s in (".json", "_encode.pt2", "_decode.pt2")]
    if not all(os.path.isfile(f) for f in files):
        raise SystemExit(
            f"error: no first stage in {path} (first_stage.json, first_stage_encode.pt2, "
            f"first_stage_decode.pt2); {first_stage_advice(args, path)}"
        )
    with open(files[0], "rb") as f:
        raw = f.read()
    meta = json.loads(raw)
    if (meta.get("data"), meta.get("resolution")) != (args.data, args.resolution):
        raise SystemExit(
            f"error: the first stage in {path} was trained on --data {meta.get('data')} at "
            f"{meta.get('resolution')} px, not --data {args.data} at {args.resolution} px; "
            f"{first_stage_advice(args)}"
        )
    try:
        encode, decode = (torch.export.load(f).module().requires_grad_(False) for f in files[1:])
        stats = [
            torch.tensor(meta[k], dtype=torch.float32).view(1, -1, 1, 1)
            for k in ("latent_mean", "latent_std")
        ]
    except Exception as e:
        raise SystemExit(
            f"error: cannot load the first stage in {path} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:100]}); {first_stage_advice(args, path)}"
        )
    return (encode, decode, stats), meta, hashlib.sha256(raw).hexdigest()[:12]


def load_clips(args, n_clips, n_frames, split, rank=0, world=1):
    """Generate clips once into a uint8 (N, T, C, H, W) tensor; rank r keeps clips r, r+world..."""
    try:
        ds = toy_data.make_dataset(
            args.data, n_clips, args.resolution, n_frames, args.seed, split, args.data_dir
        )
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"error: {e}")
    threads = torch.get_num_threads()
    # per-frame simulation ops are tiny: extra threads only contend (5x slower on a busy CPU)
    torch.set_num_threads(1)
    try:
        indices = range(rank, min(n_clips, len(ds)), world)
        shown = progress(indices, len(indices), f"{split} clips", show=rank == 0)
        # uint8 clip by clip, not after the stack: no float copy of every clip (4 bytes a value)
        clips = [(ds[i]["video"].clamp(0, 1) * 255).round().to(torch.uint8) for i in shown]
    finally:
        torch.set_num_threads(threads)
    if not clips:
        raise SystemExit(
            f"error: --data {args.data} gave no {split} clips; check --data-dir or raise "
            "--train-clips/--eval-clips"
        )
    return torch.stack(clips)


def test_set(args, fs):
    """The clips the figures in metrics.json come from (split 'test'): uint8 clips, latents."""
    clips = load_clips(args, args.eval_clips, args.context + args.horizon, "test")
    return clips, encode_clips(fs[0], clips, fs[2])


def load_video(args, channels):
    """--video as a uint8 (1, T, C, H, W) clip at --resolution, grey when the first stage is."""
    try:
        video = toy_data.read_video(args.video, args.resolution)[None]
    except ValueError as e:
        raise SystemExit(f"error: {e}; pass a video file (.mp4, .gif, ...) or a folder of frames")
    if channels == 1:
        video = video.float().mean(2, keepdim=True).round().byte()
    if video.shape[1] < args.context:
        raise SystemExit(
            f"error: {args.video} has {video.shape[1]} frames, fewer than --context {args.context}"
        )
    return video


@torch.no_grad()
def encode_clips(encode, clips, stats, batch=256, what=None):
    """uint8 clips (N, T, C, H, W) -> latents (N, T, c, h, w) normalised per channel with the first
    stage's mean and std (unit scale, like the noise the flow starts from). With `what`, a
    progress line names it."""
    x = clips.flatten(0, 1)
    starts = range(0, len(x), batch)
    shown = progress(starts, len(starts), f"{what} ({batch} frames a batch)", show=what is not None)
    z = torch.cat([encode(x[i : i + batch].float() / 255) for i in shown])
    return ((z - stats[0]) / stats[1]).unflatten(0, clips.shape[:2])


@torch.no_grad()
def decode_latents(decode, z, stats, batch=256):
    """Normalised latents (..., c, h, w) -> frames in [0, 1] (quantise, then decode, on the CPU)."""
    flat = z.flatten(0, -4).float().cpu() * stats[1] + stats[0]
    x = torch.cat([decode(flat[i : i + batch]) for i in range(0, len(flat), batch)])
    return x.clamp(0, 1).unflatten(0, z.shape[:-3])


def training_latents(args, fs, fs_id, rank=0, world=1):
    """The latent cache: every training clip encoded once. With --latent-cache it lives on disk and
    is memory-mapped, so a big data set need not fit in memory and later runs skip generating and
    encoding."""
    fields = (args.data, args.data_dir, args.seed, args.resolution, args.frames, args.train_clips)
    key = hashlib.sha256(repr((*fields, rank, world, fs_id)).encode()).hexdigest()[:16]
    path = os.path.join(args.latent_cache, f"train_{key}.pt") if args.latent_cache else None
    if path and os.path.isfile(path):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    clips = load_clips(args, args.train_clips, args.frames, "train", rank, world)
    z = encode_clips(fs[0], clips, fs[2], what="encoding train clips" if rank == 0 else None)
    if path:
        os.makedirs(args.latent_cache, exist_ok=True)
        torch.save(z, path + f".tmp{rank}")
        os.replace(path + f".tmp{rank}", path)
    return z


# ------------------------------------------------------------------------------------- evaluation
def fd_probe_score(out, pred, target, context):
    """Add fd_probe of the whole clips (observed context + predicted) against the real ones to a
    prediction summary (None and the reason if the probe is missing)."""
    try:
        out["fd_probe"] = metrics.fd_probe(
            torch.cat([context, target], 1), torch.cat([context, pred], 1)
        )
    except metrics.MetricUnavailable as e:  # metrics.json says why, as compute_all_metrics does
        out["fd_probe"] = None
        out["fd_probe_unavailable"] = str(e)
    return out


@torch.no_grad()
def validation_losses(model, z_val, args, device, amp, batch=256):
    """Flow-matching loss on held-out latent clips (fixed draws), also with the context replaced by
    the reference (higher if the context is used), and the one-step endpoint MSE against
    copy-last's (copy-last's field error grows as 1/(1-t))."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    sums = torch.zeros(4, dtype=torch.float64)
    for _ in range(args.val_draws):
        for i in range(0, len(z_val), batch):
            clips = z_val[i : i + batch].to(device)
            loss, (inputs, u, z1, v) = river_loss(model, clips, gen, args.sigma_min, amp, "sum")
            x_t, t, ref, _, delta = inputs
            with amp:
                v_ref = model(x_t, t, ref, ref, delta).float()
            x1 = predicted_endpoint(x_t, v, t, args.sigma_min)
            terms = [loss] + [
                F.mse_loss(a, b, reduction="sum") for a, b in ((v_ref, u), (x1, z1), (ref, z1))
            ]
            sums += torch.stack([term.double().cpu() for term in terms])
    sums = (sums / (args.val_draws * z_val[:, 0].numel())).tolist()
    return {
        "loss": sums[0],
        "loss_context_is_reference": sums[1],
        "endpoint_mse": sums[2],
        "endpoint_mse_copy_last": sums[3],
    }


def past_horizon(args):
    """--past-horizon; None: --frames - 1, the farthest context seen in training."""
    return args.past_horizon if args.past_horizon is not None else args.frames - 1


def rollout(model, z_context, n_frames, args, device, amp, gen, batch=64):
    """Latents of observed frames (N, T, ...) -> n_frames predicted latents (CPU), NFE per frame,
    seconds."""
    out = []
    nfe = 0
    t0 = time.perf_counter()
    for i in range(0, len(z_context), batch):
        history = z_context[i : i + batch].to(device)
        z, n = generate(
            model,
            history,
            n_frames,
            args.ode_steps,
            args.solver,
            args.warm_start,
            past_horizon(args),
            args.sigma_min,
            gen,
            amp,
        )
        out.append(z.cpu())
        nfe = n // n_frames
    return torch.cat(out), nfe, time.perf_counter() - t0


@torch.no_grad()
def evaluate(model, fs, clips, z_val, args, device, amp):
    """Condition on the first --context frames of held-out clips and predict --horizon frames.
    -> (model scores, baselines (copy_last; first_stage: the truth encoded and decoded, the best a
    latent predictor can do), validation terms, per-frame tensors)"""
    model.eval()
    c = args.context
    truth = clips.float() / 255
    val = validation_losses(model, z_val, args, device, amp)
    gen = torch.Generator().manual_seed(args.seed + 2)
    z, nfe, secs = rollout(model, z_val[:, :c], args.horizon, args, device, amp, gen)
    model.train()
    pred = decode_latents(fs[1], z, fs[2])
    val.update(
        nfe_per_frame=nfe,
        gen_frames_per_s=z.shape[0] * z.shape[1] / secs,
        gen_s_per_frame=secs / z.shape[1],
    )
    context, target = truth[:, :c], truth[:, c:]
    scores, curves = metrics.score_prediction(pred, context, target)
    autoencoded = decode_latents(fs[1], z_val[:, c:], fs[2])
    scores["first_stage"], curves["first_stage"] = metrics.prediction_scores(autoencoded, target)
    for name, video in (
        ("model", pred),
        ("copy_last", metrics.copy_last(context, len(target[0]))),
        ("first_stage", autoencoded),
    ):
        fd_probe_score(scores[name], video, target, context)
    ours = scores.pop("model")
    return ours, scores, val, curves


def run_eval(model, fs, clips, z_val, args, rt, step, writer=None, tag="eval"):
    """evaluate(), printed in one line and logged to TensorBoard under tag (rank 0; "eval": val
    clips, "test": test clips). -> evaluate()'s tuple"""
    ours, base, val, curves = evaluate(model, fs, clips, z_val, args, rt.device, rt.amp)
    copy_last = base["copy_last"]
    if writer:
        log_scalars(writer, tag, ours, step)
        log_scalars(writer, tag, {f"copy_last_{k}": v for k, v in copy_last.items()}, step)
        log_scalars(writer, tag, {f"val_{k}": v for k, v in val.items() if "_per_" not in k}, step)
        log_scalars(writer, "perf", {k: v for k, v in val.items() if "_per_" in k}, step)
    print(
        f"{tag} step {step}: PSNR {ours['psnr']:.2f} dB (copy_last {copy_last['psnr']:.2f}, "
        f"first stage {base['first_stage']['psnr']:.2f})  SSIM {ours['ssim']:.4f} "
        f"({copy_last['ssim']:.4f}) over {args.horizon} frames | loss {val['loss']:.4f} "
        f"(context := reference {val['loss_context_is_reference']:.4f})  endpoint MSE "
        f"{val['endpoint_mse']:.4f} (copy_last {val['endpoint_mse_copy_last']:.4f}) | "
        f"{val['nfe_per_frame']} NFE/frame, {val['gen_s_per_frame']:.3f} s/frame for "
        f"{len(z_val)} clips",
        flush=True,
    )
    return ours, base, val, curves


def save_samples(model, fs, demo, args, device, amp, step, writer, name="rollout"):
    """Long rollouts of demo clips (N, T, C, H, W uint8, T >= --context): truth | prediction |
    |error| GIF with the context marked, a still strip, and the same comparison in TensorBoard."""
    c = args.context
    truth = demo.float() / 255
    model.eval()
    z_context = encode_clips(fs[0], demo[:, :c], fs[2]).to(device)
    gen = torch.Generator().manual_seed(args.seed + 3)
    z, _, _ = rollout(model, z_context, args.rollout, args, device, amp, gen)
    model.train()
    pred = torch.cat([truth[:, :c], decode_latents(fs[1], z, fs[2])], 1)
    tag = f"{name}_{step:06d}" if name == "rollout" else name
    cmp = viz.create_video_comparison(
        {"truth": truth, "prediction": pred},
        os.path.join(args.out_dir, "samples", f"{tag}.gif"),
        context_frames=c,
    )
    k = max(1, pred.shape[1] // 12)
    viz.save_video_grid(
        pred[:, ::k],
        os.path.join(args.out_dir, "samples", f"{name}_latest.png"),
        [f"frames 1-{c} observed, then predicted (one frame in {k})"] * len(pred),
    )
    viz.log_video(writer, "samples/truth_prediction_error", np.moveaxis(cmp, -1, 1), step, fps=4)


def save_plots(curves, args):
    for name, label in (
        ("psnr", "PSNR (dB)"),
        ("ssim", "SSIM"),
        ("mse_frame_sum", "MSE per frame (sum over pixels)"),
    ):
        file = "horizon.png" if name == "psnr" else f"horizon_{name}.png"
        viz.plot_metric_vs_horizon(
            {k: v[name] for k, v in curves.items()},
            os.path.join(args.out_dir, "plots", file),
            metric=label,
            context=args.context,
        )


def write_metrics(results, perf, args, step, t_start):
    """Plots and metrics.json from evaluate()'s results (rank 0)."""
    ours, base, val, curves = results
    save_plots(curves, args)
    perf.update({k: val.pop(k) for k in ("nfe_per_frame", "gen_frames_per_s", "gen_s_per_frame")})
    report = {
        "script": SCRIPT,
        "step": step,
        "wall_s": round(time.time() - t_start, 1),
        "eval": ours,
        "baselines": base,
        "losses": val,  # on the same test clips
        "perf": perf,
        "sampler": {
            "solver": args.solver,
            "ode_steps": args.ode_steps,
            "warm_start": args.warm_start,
            "past_horizon": past_horizon(args),
        },
        "data": {
            "kind": args.data,
            "resolution": args.resolution,
            "split": "test",
            "n_eval": len(curves["model"]["psnr"]),
            "context": args.context,
            "horizon": args.horizon,
            "first_stage": args.vqvae,
        },
    }
    write_json(os.path.join(args.out_dir, "metrics.json"), report)


def summary(results, args, trained):
    """The last line of a run: the held-out prediction against copy_last (and the first stage's
    own reconstruction, the best a latent predictor can do) and where every output is."""
    ours, base = results[:2]
    copy_last, first_stage = base["copy_last"], base["first_stage"]
    files = "ckpt.pt, args.json, " * trained + "metrics.json, samples/, plots/"
    if trained:
        files += f", TensorBoard events (tensorboard --logdir {args.out_dir})"
    return (
        f"held-out prediction of {args.horizon} frames after {args.context}: PSNR "
        f"{ours['psnr']:.2f} dB (copy_last {copy_last['psnr']:.2f}, first stage "
        f"{first_stage['psnr']:.2f}), SSIM {ours['ssim']:.4f} (copy_last "
        f"{copy_last['ssim']:.4f}); in {args.out_dir}: {files}"
    )


def bench(model, z_context, args, device, amp):
    """Constant cost: NFE and wall seconds per frame for rollouts of --bench-frames frames, after a
    warm-up run; the fastest of 3 runs each, as other jobs on the machine only ever add time."""
    model.eval()
    rollout(model, z_context, 2, args, device, amp, torch.Generator().manual_seed(0))
    out = {}
    for n in args.bench_frames:
        runs = []
        for _ in range(3):
            gen = torch.Generator().manual_seed(args.seed)
            runs.append(rollout(model, z_context, n, args, device, amp, gen))
        out[str(n)] = {"nfe_per_frame": runs[0][1], "s_per_frame": min(r[2] for r in runs) / n}
    first = out[str(args.bench_frames[0])]["s_per_frame"]
    out = {n: {**v, "s_per_frame_ratio": v["s_per_frame"] / first} for n, v in out.items()}
    return {
        "batch": len(z_context),
        "solver": args.solver,
        "ode_steps": args.ode_steps,
        "warm_start": args.warm_start,
        "frames": out,
    }


def sample_from_checkpoint(raw, fs, clips, z_val, demo, video, args, rt, step):
    """--video, --bench, --eval-only (rank 0): outputs of the loaded checkpoint, no training."""
    for sub in ("samples", "plots"):
        os.makedirs(os.path.join(args.out_dir, sub), exist_ok=True)
    if video is not None:
        name = os.path.splitext(os.path.basename(args.video.rstrip("/")))[0]
        save_samples(raw, fs, video, args, rt.device, rt.amp, step, None, name=f"video_{name}")
        print(
            f"wrote {args.out_dir}/samples/video_*.gif ({args.rollout} frames after "
            f"{args.context} of {args.video})"
        )
    if args.bench:
        b = bench(raw, z_val[:8, : args.context].to(rt.device), args, rt.device, rt.amp)
        path = os.path.join(args.out_dir, "metrics.json")
        report = {"script": SCRIPT, "step": step}
        if os.path.isfile(path):  # add to the evaluation already there
            with open(path) as f:
                report = json.load(f)
        write_json(path, {**report, "bench": b})
        for n, v in b["frames"].items():
            print(
                f"bench: {n:>3} frames  {v['nfe_per_frame']} NFE/frame  {v['s_per_frame']:.4f} "
                f"s/frame (x{v['s_per_frame_ratio']:.2f})  batch {b['batch']}",
                flush=True,
            )
    if args.eval_only:
        results = run_eval(raw, fs, *test_set(args, fs), args, rt, step, tag="test")
        t_start = time.time()
        save_samples(raw, fs, demo, args, rt.device, rt.amp, step, None)
        n_params = sum(p.numel() for p in raw.parameters())
        perf = {"train_samples_per_s": None, "mfu": None, "params": n_params}
        write_metrics(results, perf, args, step, t_start)
        print(summary(results, args, trained=False))


# ---------------------------------------------------------------------------------------- training
SAMPLING_FLAGS = (  # change only evaluation, samples and the latent cache's place: free on resume
    "bench bench_frames video solver ode_steps warm_start past_horizon val_draws context horizon "
    "rollout eval_clips vqvae latent_cache"
).split()


def check_args(args):
    """Stop with one line on bad flags, before anything is written. -> (checkpoint path, whether
    the run only samples from a checkpoint: --eval-only, --bench or --video)"""
    counts = ["steps", "batch_size", "train_clips", "eval_clips", "frames", "context", "horizon"]
    counts += ["rollout", "width", "heads", "depth", "ode_steps", "val_draws"]
    check_counts(args, counts + ["log_every", "eval_every", "sample_every", "ckpt_every"])
    if args.frames < 3 or min(args.bench_frames) < 1:
        raise SystemExit(
            "error: need --frames >= 3 (target, reference, context) and --bench-frames >= 1, got "
            f"{args.frames} and {args.bench_frames}"
        )
    if args.width % args.heads:
        raise SystemExit(f"error: --heads {args.heads} must divide --width {args.width}")
    if not 0 <= args.warm_start < 1 or args.past_horizon == 1 or (args.past_horizon or 0) < 0:
        raise SystemExit(
            "error: need 0 <= --warm-start < 1 and --past-horizon 0 or >= 2 (it counts the "
            f"reference), got {args.warm_start} and {args.past_horizon}"
        )
    try:  # --data-dir implies its kind when --data is left at its default
        args.data = toy_data.data_kind(args.data, args.data_dir, Args.data)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    sample_only = args.eval_only or args.bench or args.video is not None
    check_data(args, ("val", "test") if sample_only else toy_data.SPLITS)
    ckpt_path = args.ckpt or os.path.join(args.out_dir, "ckpt.pt")
    if args.ckpt and not os.path.isfile(args.ckpt):
        raise SystemExit(
            f"error: --ckpt {args.ckpt} does not exist; pass the path of a {SCRIPT} ckpt.pt"
        )
    if sample_only and not os.path.isfile(ckpt_path):
        raise SystemExit(
            f"error: --eval-only, --bench and --video need a checkpoint but {ckpt_path} does not "
            "exist; train first or pass --ckpt"
        )
    return ckpt_path, sample_only


def load_model(args, meta, fs_id, ckpt_path, from_ckpt, rt):
    """The regressor for these flags and this first stage, with the weights of ckpt_path when
    from_ckpt and it exists. -> (model, arch, checkpoint or None)"""
    channels, grid = meta["latent_shape"][:2]
    arch = dict(
        channels=channels,
        grid=grid,
        width=args.width,
        heads=args.heads,
        depth=args.depth,
        mid_depth=args.mid_depth,
        dropout=args.dropout,
        first_stage=fs_id,
    )
    ckpt = None
    if from_ckpt and os.path.isfile(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, arch)
    raw = VectorField(**{k: v for k, v in arch.items() if k != "first_stage"}).to(rt.device)
    if ckpt:
        load_weights(raw, ckpt["model"], ckpt_path)
    return raw, arch, ckpt


def training_state(raw, ckpt, args, rt):
    """AdamW, the fp16 loss scaler and this rank's data generator; restored from ckpt, together
    with every RNG. -> (optimizer, scaler, generator)"""
    gen = torch.Generator().manual_seed(args.seed + 1000 * rt.rank)
    opt = torch.optim.AdamW(
        raw.parameters(),
        lr=args.lr,
        betas=(0.9, 0.999),
        weight_decay=args.weight_decay,
        fused=rt.device.type == "cuda",
    )
    scaler = make_scaler(rt)
    if ckpt:
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        data_state = set_rng_state(ckpt["rng"], rt.rank)
        if data_state is not None:
            gen.set_state(data_state)
    return opt, scaler, gen


def step_flops(raw, pool, args, rt):
    """FLOPs of one training step (forward and backward of river_loss), for GFLOP/s and MFU."""
    clips = pool[: args.batch_size].to(rt.device)
    gen = torch.Generator().manual_seed(0)
    flops = count_flops(lambda: river_loss(raw, clips, gen, args.sigma_min, rt.amp)[0].backward())
    raw.zero_grad(set_to_none=True)
    return flops


# ==================================================================================================
# Infrastructure: byte-identical in every train_*.py (tests/test_infrastructure.py compares them).
# Device and precision, DDP, seeding, checkpoints, the loss and speed meters, logging, teardown.
# Skip it to read the method: `diff train_vqvae.py train_river.py` shows the method and little else.
# ==================================================================================================
SCRIPT = os.path.basename(__file__)
WARMUP_STEPS = 3  # first steps of a run (compile, allocator warm-up) stay out of the speed figures
PEAK_FLOPS = {  # dense bf16/fp16 tensor-core peaks, for MFU
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "V100": 125e12,
    "T4": 65e12,
}


@dataclass
class Runtime:
    """Where and how this process runs: made once by setup()."""

    device: torch.device
    dtype: str
    amp: object  # autocast context (nullcontext in fp32), reused for every forward
    compile: bool
    rank: int
    world: int
    ddp: bool  # world > 1
    master: bool  # rank 0: the one that writes


def cpu_has_bf16():
    try:  # Linux only; elsewhere fp32 is the safe default
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_dtype(dev):
    """bf16 where it is fast (CUDA with bf16, CPUs with native bf16), fp16 on older GPUs, else
    fp32."""
    if dev == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if dev == "cpu" and cpu_has_bf16() else "float32"


def setup(args):
    """Device, precision, process group and seeds from the system flags -> Runtime."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible; use --device cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if dev == "cuda" else dev)
    if dev == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev == "cuda" else "gloo")
    dtype = args.dtype if args.dtype != "auto" else auto_dtype(dev)
    ptdtype = getattr(torch, dtype)
    amp = torch.autocast(device.type, dtype=ptdtype) if ptdtype != torch.float32 else nullcontext()
    use_compile = args.compile if args.compile is not None else dev == "cuda"
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed)  # the same on every rank: identical initial weights
    return Runtime(device, dtype, amp, use_compile, rank, world, world > 1, rank == 0)


def device_name(rt):
    return torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else rt.device.type


MEASURED_PEAKS = {}  # (device, dtype, threads) -> FLOP/s, measured once per process


def peak_flops(rt):
    """FLOP/s to compare a step with: the accelerator's dense bf16/fp16 peak where the table knows
    it, else a matmul in the run's dtype measured once: the best of up to 20 1024^3 products (for
    at most about half a second) on the threads the run uses; the best, because other jobs on the
    machine only ever slow a product down. -> (FLOP/s, "table" or "measured")."""
    known = next((v for k, v in PEAK_FLOPS.items() if k in device_name(rt)), None)
    if known:
        return known, "table"
    key = (str(rt.device), rt.dtype, torch.get_num_threads())
    if key not in MEASURED_PEAKS:
        n = 1024
        a = torch.ones(n, n, device=rt.device, dtype=getattr(torch, rt.dtype))  # no RNG draw
        times = []
        while len(times) < 20 and (len(times) < 3 or sum(times) < 0.5):
            sync(rt.device)
            t = time.perf_counter()
            a @ a
            sync(rt.device)
            times.append(time.perf_counter() - t)
        MEASURED_PEAKS[key] = 2 * n**3 / min(times)
    return MEASURED_PEAKS[key], "measured"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compiled_graphs():
    """Graphs torch.compile has made in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def count_flops(fn):
    """FLOPs of one call of fn() (forward and backward, as fn does them). Eager: compiled code run
    under the counter was seen to compile no new graph for the rest of the process. The global RNG
    (dropout) is restored, so counting leaves the run as it was."""
    from torch.utils.flop_counter import FlopCounterMode

    eager = torch.compiler.set_stance("force_eager")
    with torch.random.fork_rng(), FlopCounterMode(display=False) as counter, eager:
        fn()
    return counter.get_total_flops()


def make_scaler(rt):
    """Loss scaling for fp16 only; a no-op otherwise."""
    return torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == "float16")


def wrap_ddp(module, rt):
    """DDP over the module when there is more than one process; the module itself otherwise."""
    if not rt.ddp:
        return module
    return DDP(module, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def lr_at(step, total, peak, warmup, decay=True):
    """Linear warm-up, then cosine decay to peak/10 at `total` (constant if not decay)."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    progress = min(1.0, step / max(1, total))
    return peak * warm * ((0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))) if decay else 1.0)


def set_lr(optimizers, lr):
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr


def optimizer_step(opt, scaler, loss, params, clip):
    """Backward, clip the gradient norm (clip > 0), step; the fp16 scaler unscales first."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, clip)
    scaler.step(opt)
    scaler.update()


def rng_state(data):
    """Every RNG state as tensors and lists, so the checkpoint loads with weights_only=True."""
    py = random.getstate()
    npr = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npr[0], torch.from_numpy(npr[1].astype(np.int64)), *npr[2:]],
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "data": data,
    }


def set_rng_state(s, rank):
    """Restore rng_state(); -> this rank's data-generator state (None if the world size changed)."""
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    np.random.set_state((s["numpy"][0], s["numpy"][1].numpy().astype(np.uint32), *s["numpy"][2:]))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_initialized():
        torch.cuda.set_rng_state_all(s["cuda"])
    return s["data"][rank] if rank < len(s["data"]) else None


def gather_states(state, rt):
    """This rank's data-generator state -> the list of every rank's (rank 0 saves them all)."""
    if not rt.ddp:
        return [state]
    states = [None] * rt.world
    dist.all_gather_object(states, state)
    return states


def first_line(e):
    return str(e).splitlines()[0][:120] if str(e) else type(e).__name__


def load_checkpoint(path, arch):
    """Read a checkpoint of this script with this architecture, or stop with one line."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(
            f"error: cannot read checkpoint {path} ({type(e).__name__}: {first_line(e)}); "
            "pass a valid --ckpt or use a new --out-dir"
        )
    got = ckpt.get("script", "an unknown script") if isinstance(ckpt, dict) else "an unknown script"
    if got != SCRIPT:
        raise SystemExit(
            f"error: {path} was written by {got}, not {SCRIPT}; "
            f"pass a {SCRIPT} checkpoint with --ckpt or use another --out-dir"
        )
    saved = ckpt.get("arch", {})
    diff = [f"{k}={saved.get(k)} (now {v})" for k, v in arch.items() if saved.get(k) != v]
    if diff:
        raise SystemExit(
            f"error: {path} has another architecture: {', '.join(diff)}; "
            "pass the model and data flags it was trained with, or use another --out-dir"
        )
    return ckpt


def load_weights(module, state, path):
    """load_state_dict, or stop with one line when the checkpoint does not fit the module."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError) as e:
        raise SystemExit(
            f"error: {path} does not match this model ({first_line(e)}); use another --out-dir"
        )


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a kill mid-write never leaves a broken file."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def save_checkpoint(path, step, args, arch, data_state, rt, **state):
    """Every rank calls this (the data-generator states are gathered); rank 0 writes atomically.
    state: modules, optimisers and scalers (saved as their state_dict) and plain values."""
    data_states = gather_states(data_state, rt)
    if not rt.master:
        return
    ckpt = {"script": SCRIPT, "step": step, "args": asdict(args), "arch": arch}
    for name, value in state.items():
        ckpt[name] = value.state_dict() if hasattr(value, "state_dict") else value
    ckpt["rng"] = rng_state(data_states)
    save_atomic(ckpt, path)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def open_writer(args, step):
    """Rank 0: samples/ and plots/ (stale .tmp files removed), args.json, TensorBoard writer with
    the args table at step 0."""
    for sub in ("samples", "plots"):
        os.makedirs(os.path.join(args.out_dir, sub), exist_ok=True)
    for stale in glob.glob(os.path.join(args.out_dir, "*.tmp")):  # left by a kill mid-write
        os.remove(stale)
    write_json(os.path.join(args.out_dir, "args.json"), asdict(args))
    writer = SummaryWriter(args.out_dir)
    if step == 0:
        rows = "\n".join(f"| {k} | {v} |" for k, v in asdict(args).items())
        writer.add_text("args", "| flag | value |\n|---|---|\n" + rows, 0)
    return writer


class LossMeter:
    """Named loss terms summed between log lines; means() averages them over steps and ranks and
    stops the run with one line when a term or a weight is not finite."""

    def __init__(self, names, device):
        self.names = names
        self.sum = torch.zeros(len(names), device=device)
        self.n = 0

    def add(self, terms):
        self.sum += torch.as_tensor(terms, dtype=torch.float32, device=self.sum.device)
        self.n += 1

    def means(self, rt, params, where):
        total = self.sum.clone()
        if rt.ddp:
            dist.all_reduce(total)
        values = (total / max(1, self.n * rt.world)).tolist()
        finite = all(math.isfinite(v) for v in values) and all(p.isfinite().all() for p in params)
        if not finite:
            raise SystemExit(
                f"error: non-finite loss ({dict(zip(self.names, values))}) {where}; lower the "
                "learning rate or use --dtype float32; the last good checkpoint was kept"
            )
        return dict(zip(self.names, values))

    def reset(self):
        self.sum.zero_()
        self.n = 0


class SpeedMeter:
    """Training time and FLOP/s per step, leaving out the first WARMUP_STEPS of a run (compilation,
    allocator warm-up) and whatever happens between tick() and lap() (evaluation, samples,
    checkpoints). peak: (FLOP/s, source) from peak_flops; flops: per step (count_flops)."""

    def __init__(self, start, peak):
        self.start = start
        self.peak, self.peak_source = peak
        self.t_last = time.perf_counter()
        self.t_start = self.t_last
        self.graphs = compiled_graphs()  # made before this run's first step
        self.warmup = None  # (seconds, graphs compiled) once the warm-up steps are done
        self.told = False  # the warm-up line has been shown
        self.win = [0.0, 0, 0.0]  # seconds, steps, FLOPs since the last log line
        self.total = [0.0, 0, 0.0]  # the same over the run

    def tick(self, step, flops=None):
        """After a training step: count its time unless it is a warm-up step."""
        now = time.perf_counter()
        if step == self.start + WARMUP_STEPS:
            self.warmup = (now - self.t_start, compiled_graphs() - self.graphs)
        if step > self.start + WARMUP_STEPS:
            self.win[0] += now - self.t_last
            self.win[1] += 1
            self.win[2] += flops or 0.0

    def lap(self):
        """Restart the clock at the end of an iteration."""
        self.t_last = time.perf_counter()

    def late_graphs(self):
        """Graphs compiled after warm-up: recompilations, which a run should never need."""
        return compiled_graphs() - self.graphs - self.warmup[1] if self.warmup else 0

    def report(self, samples_per_step, steps_left):
        """-> (text for the log line, perf scalars); then starts a new window."""
        seconds, steps, flops = self.win
        for i in range(3):
            self.total[i] += self.win[i]
        self.win = [0.0, 0, 0.0]
        if not steps:
            return "warm-up", {}
        ms = 1000 * seconds / steps
        perf = {"steps_per_s": 1000 / ms, "samples_per_s": samples_per_step * 1000 / ms}
        rate = "GFLOP/s n/a"
        if flops:
            perf["gflop_per_s"] = flops / seconds / 1e9
            perf["mfu"] = flops / seconds / self.peak
            rate = f"{perf['gflop_per_s']:.1f} GFLOP/s, MFU {perf['mfu']:.1%}"
        eta = steps_left * ms / 60000
        samples = perf["samples_per_s"]
        text = f"{ms:.0f} ms/step | {samples:.0f} samples/s | {rate} | ETA {eta:.1f} min"
        if not self.told:
            self.told = True
            s, graphs = self.warmup
            peak = f"{self.peak / 1e9:.0f} GFLOP/s ({self.peak_source})"
            text += f"\n  warm-up {s:.1f} s, {graphs} graphs compiled; peak {peak}"
        if self.late_graphs():
            text += f" | {self.late_graphs()} graphs compiled after warm-up: TORCH_LOGS=recompiles"
        return text, perf

    def summary(self, samples_per_step):
        """Training speed over the whole run, compilation and peak memory, for metrics.json."""
        seconds, steps, flops = self.total
        perf = {
            "train_samples_per_s": samples_per_step * steps / seconds if seconds else None,
            "train_ms_per_step": 1000 * seconds / steps if steps else None,
            "train_gflop_per_s": flops / seconds / 1e9 if flops and seconds else None,
            "peak_gflop_per_s": self.peak / 1e9,
            "peak_source": self.peak_source,
            "mfu": flops / seconds / self.peak if flops and seconds else None,
            "warmup_s": self.warmup[0] if self.warmup else None,
            "graphs_compiled": compiled_graphs() - self.graphs,
            "graphs_after_warmup": self.late_graphs(),
        }
        if torch.cuda.is_initialized():
            perf["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        return perf


def log_scalars(writer, prefix, values, step):
    """Numbers of `values` as TensorBoard scalars prefix/key (nothing without a writer)."""
    if writer is None:
        return
    for k, v in values.items():
        if isinstance(v, (int, float)):
            writer.add_scalar(f"{prefix}/{k}", v, step)


def log_progress(meter, speed, writer, params, rt, step, total, lr, samples_per_step, name=""):
    """Every rank: the loss terms averaged since the last call (a non-finite one stops the run).
    Rank 0: one console line and train/ and perf/ scalars. name: the stage, in a script of several
    stages (train/<name>/ scalars)."""
    where = f"in stage {name} before step {step}" if name else f"before step {step}"
    means = meter.means(rt, params, where)
    meter.reset()
    speed_text, perf = speed.report(samples_per_step, total - step)
    if rt.master:
        losses = " ".join(f"{k} {v:.4g}" for k, v in means.items())
        prefix = f"{name} step" if name else "step"
        print(f"{prefix} {step}/{total} | {losses} | lr {lr:.2e} | {speed_text}", flush=True)
        scope = f"/{name}" if name else ""
        log_scalars(writer, "train" + scope, {**means, "lr": lr}, step)
        log_scalars(writer, "perf" + scope, perf, step)
    return means


class Control:
    """Decisions taken at step boundaries, the same on every rank (one all-reduce a step).
    Ctrl-C (SIGINT) and SIGTERM, which schedulers send, ask the loop to stop: it finishes the
    step, saves a checkpoint and exits; a second signal stops at once. A log line is due after
    the first step of a run, then at least every LOG_SECONDS."""

    LOG_SECONDS = 30.0

    def __init__(self, rt):
        self.rt = rt
        self.signal = 0
        self.t_log = time.perf_counter()
        self.handlers = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.handlers[sig] = signal.signal(sig, self.ask_to_stop)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)

    def ask_to_stop(self, signum, frame):
        if self.signal:  # the second signal: no waiting for the step to end
            raise KeyboardInterrupt
        self.signal = signum
        if self.rt.master:
            print("stopping after this step (a second Ctrl-C stops at once)", flush=True)

    def poll(self, step, start):
        """After a step -> (stop, log): stop and save now; print a log line now."""
        late = time.perf_counter() - self.t_log > self.LOG_SECONDS
        flags = torch.tensor([float(self.signal != 0), float(step == start + 1 or late)])
        if self.rt.ddp:
            flags = flags.to(self.rt.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[1]:
            self.t_log = time.perf_counter()
        return bool(flags[0]), bool(flags[1])


def run(main, args):
    """main(args); an interrupt outside the training loop (data, evaluation, plots) ends with one
    line and exit code 130 instead of a traceback. Checkpoints are only ever replaced whole."""
    try:
        main(args)
    except KeyboardInterrupt:
        print(
            "\ninterrupted; checkpoints are replaced whole, so the last one saved is intact",
            file=sys.stderr,
        )
        raise SystemExit(130) from None


def progress(items, total, what, show=True):
    """Yield items; every few seconds print how far `what` has got and the time left."""
    t0 = time.perf_counter()
    t_shown = t0
    for i, item in enumerate(items):
        now = time.perf_counter()
        wait = 1.0 if t_shown == t0 else 5.0  # the first line after a second, then every 5 s
        if show and i and now - t_shown > wait:
            eta = (now - t0) / i * (total - i)
            print(f"{what}: {i}/{total}, {now - t0:.0f} s, ETA {eta:.0f} s", flush=True)
            t_shown = now
        yield item


def check_counts(args, names):
    """Stop with one line when a count flag is below 1."""
    for name in names:
        value = getattr(args, name)
        if value < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} {value} must be at least 1")


RESUME_FREE = set(  # flags that change neither the schedule nor the data: free to differ on resume
    "out_dir resume eval_only ckpt log_every eval_every sample_every ckpt_every device dtype "
    "compile accept_changed_args".split()
)


def flag_text(name, value):
    """One flag as a command line writes it."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + name.replace("_", "-")
    if isinstance(value, (list, tuple)):
        return " ".join([flag, *(shlex.quote(str(v)) for v in value)])
    return f"{flag} {shlex.quote(str(value))}"


def check_resume(ckpt, args, path, free=()):
    """Resuming with flags that change the schedule, the data or the run's length would silently
    give another run than the one the checkpoint started: refuse, with the command that
    continues exactly, unless --accept-changed-args."""
    now = asdict(args)
    saved = ckpt.get("args", {})
    skip = RESUME_FREE | set(free)
    changed = [k for k in saved if k in now and k not in skip and saved[k] != now[k]]
    if not changed or args.accept_changed_args:
        return
    was = " ".join(flag_text(k, saved[k]) for k in changed)
    asked = " ".join(flag_text(k, now[k]) for k in changed)
    raise SystemExit(
        f"error: {path} was trained with {was}, not {asked}; to continue it exactly, run again "
        f"with {was}; to resume with the new values on purpose, add --accept-changed-args; "
        "to start over, --no-resume or another --out-dir"
    )


def teardown(rt):
    """Leave the process group together: rank 0 may still be evaluating."""
    if rt.ddp:
        dist.barrier()
        dist.destroy_process_group()


# ==================================================================================================
# End of infrastructure.
# ==================================================================================================


def main(args: Args):
    rt = setup(args)
    ckpt_path, sample_only = check_args(args)  # before anything is written
    fs, meta, fs_id = load_first_stage(args.vqvae, args)  # (encode, decode, latent statistics)
    raw, arch, ckpt = load_model(args, meta, fs_id, ckpt_path, args.resume or sample_only, rt)
    if ckpt and not sample_only:  # before any data is made: a refused resume fails fast
        check_resume(ckpt, args, ckpt_path, free=SAMPLING_FLAGS)
    step = ckpt["step"] if ckpt else 0
    eval_clips = load_clips(args, args.eval_clips, args.context + args.horizon, "val")
    video = None
    if args.video is not None:
        video = load_video(args, eval_clips.shape[2])
    probe = metrics.default_probe_path()
    if rt.master and not (args.bench or args.video) and not os.path.isfile(probe):
        print(  # say so now, not after the run
            f"warning: no probe at {probe}, so fd_probe will be None; run `python train_probe.py`",
            flush=True,
        )
    z_val = encode_clips(fs[0], eval_clips, fs[2])
    # long rollouts for the GIFs
    demo = load_clips(args, min(4, args.eval_clips), args.context + args.rollout, "val")
    if sample_only:
        if rt.master:
            sample_from_checkpoint(raw, fs, eval_clips, z_val, demo, video, args, rt, step)
        teardown(rt)
        return

    # ---- training state
    pool = training_latents(args, fs, fs_id, rt.rank, rt.world)  # (clips, frames, c, h, w)
    opt, scaler, gen = training_state(raw, ckpt, args, rt)
    flops = step_flops(raw, pool, args, rt)  # counted once
    model = wrap_ddp(torch.compile(raw) if rt.compile else raw, rt)
    state = {"model": raw, "optimizer": opt, "scaler": scaler}  # what a checkpoint holds
    ckpt_file = os.path.join(args.out_dir, "ckpt.pt")
    writer = None  # TensorBoard, rank 0 only
    n_params = sum(p.numel() for p in raw.parameters())
    if rt.master:
        writer = open_writer(args, step)
        print(
            f"train_river: {n_params / 1e6:.2f}M params, {rt.device.type} {rt.dtype}, compile "
            f"{rt.compile}, world {rt.world}, {len(pool)} training clips/rank of {args.data} as "
            f"{arch['channels']}x{arch['grid']}x{arch['grid']} latents, from step {step} to "
            f"{args.steps}; {args.solver} {args.ode_steps}-point grid, warm start "
            f"{args.warm_start}; outputs in {args.out_dir}",
            flush=True,
        )

    # ---- the loop
    meter = LossMeter(["loss"], rt.device)
    speed = SpeedMeter(step, peak_flops(rt))
    t_start = time.time()
    with Control(rt) as control:
        while step < args.steps:
            lr = river_lr_at(step, args.steps, args.lr, args.warmup_steps)
            set_lr([opt], lr)
            clips = pool[torch.randint(len(pool), (args.batch_size,), generator=gen)].to(rt.device)
            loss, _ = river_loss(model, clips, gen, args.sigma_min, rt.amp)
            optimizer_step(opt, scaler, loss, raw.parameters(), args.grad_clip)
            meter.add(loss.detach().view(1))
            step += 1
            speed.tick(step, flops)
            stop, log_now = control.poll(step, speed.start)
            if log_now or step % args.log_every == 0 or step == args.steps:
                samples = args.batch_size * rt.world
                log_progress(
                    meter, speed, writer, raw.parameters(), rt, step, args.steps, lr, samples
                )
            more = step < args.steps and not stop  # the final evaluation follows the loop
            if rt.master and more and step % args.eval_every == 0:
                run_eval(raw, fs, eval_clips, z_val, args, rt, step, writer)
            if rt.master and more and step % args.sample_every == 0:
                save_samples(raw, fs, demo, args, rt.device, rt.amp, step, writer)
            if stop or step % args.ckpt_every == 0 or step == args.steps:
                # never save weights that have gone non-finite since the last log
                meter.means(rt, raw.parameters(), f"before step {step}")
                save_checkpoint(ckpt_file, step, args, arch, gen.get_state(), rt, **state)
            if stop:
                raise SystemExit(
                    f"interrupted after step {step}; saved {ckpt_file}: run the same command to "
                    "resume"
                )
            speed.lap()  # evaluation and checkpoint time stay out of the speed figures

    if rt.master:
        results = run_eval(raw, fs, *test_set(args, fs), args, rt, step, writer, "test")
        save_samples(raw, fs, demo, args, rt.device, rt.amp, step, writer)
        speeds = speed.summary(args.batch_size * rt.world)
        perf = {**speeds, "params": n_params, "device": device_name(rt), "dtype": rt.dtype}
        write_metrics(results, perf, args, step, t_start)
        writer.close()
        curves_png = os.path.join(args.out_dir, "plots", "training_curves.png")
        viz.plot_training_curves(args.out_dir, curves_png)
        print(summary(results, args, trained=True))
    teardown(rt)


if __name__ == "__main__":
    run(main, tyro.cli(Args))
