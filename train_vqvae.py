"""Per-frame VQ-VAE: the frozen first stage of RIVER.

Each frame (64x64) is encoded to an 8x8 grid of `--latent-channels` numbers; every grid cell
is snapped to the nearest of `--codebook-size` codes (straight-through gradient, commitment
loss, EMA codebook with dead-code restarts) and decoded back. RIVER flow-matches the
*pre-quantisation* latents z_e and decodes its samples by quantise-then-decode.

Papers: van den Oord et al., "Neural Discrete Representation Learning" (2017);
Davtyan, Sameni, Favaro, "Efficient Video Prediction via Sparsely Conditioned Flow
Matching" (RIVER, ICCV 2023). Deviations from RIVER's autoencoder: smaller width, strided-conv
downsampling, EMA codes with restarts instead of a codebook loss, no LPIPS, an optional patch-GAN
term (off by default; adaptive weight measured at the decoder output) and a linear output clamped
to [0, 1] instead of tanh.

With --temporal-downsample N > 1 it is VideoGPT's first stage instead (Yan et al., "VideoGPT: Video
Generation using VQ-VAE and Transformers", 2021): clips (B, T, C, H, W) go through strided 4x4x4
3D convolutions (ReLU) and axial-attention residual units (attention along time, rows and columns,
summed) to a (T/N, H/S, W/S) grid of codes, S = --spatial-downsample, and back through transposed
3D convolutions; the same EMA codebook. Deviations from VideoGPT's: the encoder is causal in time
(padding in front, masked attention along time, GroupNorm per frame instead of BatchNorm), so the
codes of the first k*N frames depend on those frames alone and frame-conditional generation can
keep them; a 1x3x3 residual unit after every strided level (narrow layers need the drawing
capacity); channels double per level from --width instead of a constant 240; the reconstruction
loss is not divided by the data variance. --local-codes (train_videogpt.py's default first stage)
replaces the encoder by a per-cell MLP, so a code depends on its own N x S x S pixels alone: with
VideoGPT's encoder the black background of Moving MNIST takes most of the codebook, with this one
a single code, and a prior of the same budget draws more digit-like samples, for 1.5 dB of
reconstruction (docs/results/train_videogpt.md).

    python train_vqvae.py                                   # CPU: ~5-8 min on 2 cores, smoke data
    python train_vqvae.py --data moving_mnist --steps 3000  # any toy_data kind, 1 or 3 channels
    python train_vqvae.py --width 64 --batch-size 128 --steps 20000 --gan-weight 0.1  # GPU
    torchrun --standalone --nproc_per_node=2 train_vqvae.py # DDP (nccl on CUDA, gloo on CPU)
    python train_vqvae.py --eval-only                       # re-evaluate runs/train_vqvae/ckpt.pt
    python train_vqvae.py --temporal-downsample 2 --spatial-downsample 4 --local-codes \\
        --resolution 32 --data moving_mnist --width 32 --latent-channels 8 --codebook-size 64 \\
        --recon-loss mse --batch-size 8 --train-clips 512 --steps 2400 --lr 2e-3 \\
        --out-dir runs/train_vqvae_3d
                                                            # VideoGPT's first stage, ~5 min
    OMP_NUM_THREADS=1 python train_vqvae.py                 # busy CPU: far faster than 2 threads

Outputs in --out-dir: ckpt.pt, args.json, metrics.json, samples/ (original | reconstruction
grids, latent PCA picture), plots/, TensorBoard events (train/{loss,rec,commit,lr},
eval/{psnr,ssim,codebook_usage,perplexity,latent_std_global,...},
perf/{steps_per_s,samples_per_s,mfu}, samples/ GIFs) and the exported first stage, which loads
without this file (torch.export programs, fp32, dynamic batch):

    # x (B, C, H, W) in [0, 1] -> z_e (B, 4, H/8, W/8)
    encode = torch.export.load("runs/train_vqvae/first_stage_encode.pt2").module()
    # z -> nearest code -> x in [0, 1]
    decode = torch.export.load("runs/train_vqvae/first_stage_decode.pt2").module()
    # latent mean/std per channel, data, shapes, codebook
    meta = json.load(open("runs/train_vqvae/first_stage.json"))

In the spatio-temporal mode the programs take clips: x (B, T, C, H, W) -> z_e (B, D, T/N, H/S,
W/S), and first_stage.json adds frames, temporal_downsample and the codebook (K x D) that
train_videogpt.py reads codes with.
"""

import copy
import glob
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
    steps: int = 2000
    """training steps (one batch per process each)"""
    seed: int = 0
    """random seed: model init, data sets and batch order"""
    out_dir: str = "runs/train_vqvae"
    """folder for ckpt.pt, metrics.json, TensorBoard events, samples/, plots/ and the exported first
    stage"""
    resume: bool = True
    """continue from --ckpt (or out_dir/ckpt.pt) when it exists"""
    eval_only: bool = False
    """evaluate the checkpoint, write metrics.json, samples and the exported first stage, then
    exit"""
    ckpt: str | None = None
    """checkpoint to resume or evaluate; None: out_dir/ckpt.pt"""
    accept_changed_args: bool = False
    """resume even if flags that shape the run (steps, lr, batch size, data, ...) differ from the
    checkpoint's (the schedule then changes mid-run)"""
    log_every: int = 50
    """print and log training losses every N steps"""
    eval_every: int = 500
    """held-out evaluation every N steps (and always at the end)"""
    sample_every: int = 500
    """write reconstruction GIFs every N steps"""
    ckpt_every: int = 500
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
    or npz (the last two need --data-dir)"""
    data_dir: str | None = None
    """folder of videos (--data folder), .npz file (--data npz) or MNIST files
    (--data moving_mnist); implies its kind when --data is left out"""
    resolution: int = 64
    """frame size in pixels (divisible by 8: the latent grid is resolution/8)"""
    frames: int = 16
    """frames per clip; training frames (whole clips with --temporal-downsample > 1) are drawn at
    random from all clips"""
    train_clips: int = 256
    """clips generated once into memory as the training pool (split 'train')"""
    eval_clips: int = 16
    """held-out clips: split 'val' for the evaluations during training, split 'test' for the
    figures in metrics.json"""
    # model
    width: int = 32
    """channels of the first stage; doubled twice on the way down to 8x8 (in 3D: doubled at every
    strided level)"""
    latent_channels: int = 4
    """channels of the latent grid (4 as in RIVER's own VQ-VAE)"""
    codebook_size: int = 512
    """number of codes"""
    attention: bool = True
    """one-head self-attention at the 8x8 level of encoder and decoder (in 3D: axial attention in
    the residual units)"""
    temporal_downsample: int = 1
    """1: the per-frame VQ-VAE (RIVER's first stage); 2, 4, ...: a spatio-temporal VQ-VAE for
    train_videogpt.py (3D convolutions, axial attention, an encoder causal in time): a clip of
    --frames frames becomes --frames/N code frames of (resolution/S)^2 codes, S =
    --spatial-downsample"""
    spatial_downsample: int = 8
    """with --temporal-downsample > 1: how much the 3D VQ-VAE shrinks each side of a frame (a power
    of 2; VideoGPT's Moving MNIST setting is 4); the per-frame VQ-VAE always uses 8"""
    local_codes: bool = False
    """with --temporal-downsample > 1: each code sees its own cell of N x S x S pixels alone (one
    strided convolution and two 1x1x1 layers instead of VideoGPT's encoder stack), so equal cells
    get equal codes: every black cell of Moving MNIST takes one code, and a prior on the codes
    spends its bits on the digits; the decoder is VideoGPT's either way"""
    # optim
    batch_size: int = 16
    """frames per batch per process (clips with --temporal-downsample > 1)"""
    lr: float = 1e-3
    """peak learning rate (Adam), after linear warm-up, cosine-decayed to lr/10"""
    warmup_steps: int = 100
    """linear learning-rate warm-up steps"""
    grad_clip: float = 1.0
    """clip the gradient norm to this (0: off)"""
    # method
    recon_loss: Literal["l1", "mse"] = "l1"
    """reconstruction loss on [0, 1] pixels"""
    beta: float = 0.25
    """commitment weight: beta * ||z_e - sg[e]||^2"""
    ema_decay: float = 0.99
    """decay of the EMA codebook statistics"""
    ema_eps: float = 1e-5
    """Laplace smoothing of the EMA code counts"""
    dead_code_frac: float = 0.03
    """restart a code when its EMA usage falls below this fraction of the mean usage (0: never)"""
    gan_weight: float = 0.0
    """weight of the VQGAN patch-discriminator hinge loss (0: off; scaled by the adaptive weight)"""
    gan_start: int = 1000
    """step at which the discriminator joins (reconstructions should be decent first)"""
    export: bool = True
    """write the frozen first stage for train_river.py (first_stage_*.pt2 + first_stage.json) at the
    end"""


# ----------------------------------------------------------------------------- model
def norm(c):
    return nn.GroupNorm(math.gcd(8, c), c)


class ResBlock(nn.Module):
    """Pre-norm residual block; resample 'down' halves, 'up' doubles (nearest) the resolution."""

    def __init__(self, cin, cout, resample=None):
        super().__init__()
        self.resample = resample
        self.n1 = norm(cin)
        self.c1 = nn.Conv2d(cin, cout, 3, stride=2 if resample == "down" else 1, padding=1)
        self.n2 = norm(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        # strided on the way down: cheaper than conv + pool at full size
        h = self.c1(F.silu(self.n1(x)))
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
        elif self.resample == "up":  # first conv at low resolution, the second after upsampling
            x = F.interpolate(x, scale_factor=2.0)
            h = F.interpolate(h, scale_factor=2.0)
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class SelfAttention(nn.Module):
    """One-head self-attention over the latent grid, so every cell sees the whole frame."""

    def __init__(self, c):
        super().__init__()
        self.norm = norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(1, 2).reshape(B, C, H, W))


def nearest_code(z, codebook):
    """Index of the nearest code (L2) for every cell of z (B, D, [t,] h, w) -> (B, [t,] h, w).
    Plain broadcasting, not a matmul: autocast leaves it in fp32, so ties and near-ties resolve
    the same under every --dtype."""
    flat = z.detach().float().movedim(1, -1).unsqueeze(-2)  # (B, [t,] h, w, 1, D)
    return (flat - codebook).pow(2).sum(-1).argmin(-1)


class VQVAE(nn.Module):
    def __init__(self, channels=3, width=32, latent_channels=4, codebook_size=512, attention=True):
        super().__init__()
        c1, c2, c3 = width, 2 * width, 4 * width
        attn = (lambda: SelfAttention(c3)) if attention else nn.Identity
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, c1, 3, padding=1),
            ResBlock(c1, c1, "down"),
            ResBlock(c1, c2, "down"),
            ResBlock(c2, c3, "down"),
            ResBlock(c3, c3),
            attn(),
            norm(c3),
            nn.SiLU(),
            nn.Conv2d(c3, latent_channels, 3, padding=1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, c3, 3, padding=1),
            ResBlock(c3, c3),
            attn(),
            ResBlock(c3, c2, "up"),
            ResBlock(c2, c1, "up"),
            ResBlock(c1, c1, "up"),
            norm(c1),
            nn.SiLU(),
            nn.Conv2d(c1, channels, 3, padding=1),
        )
        # the codebook is a buffer: it moves by EMA (update_codebook), not by gradients
        self.register_buffer("codebook", torch.zeros(codebook_size, latent_channels))
        self.register_buffer("ema_count", torch.zeros(codebook_size))
        self.register_buffer("ema_sum", torch.zeros(codebook_size, latent_channels))

    def encode(self, x):
        """x (B, C, H, W) in [0, 1] -> pre-quantisation latents z_e (B, D, H/8, W/8)."""
        return self.encoder(x * 2 - 1)

    def quantize(self, z):
        """-> nearest codes z_q (B, D, h, w) and their indices (B, h, w)."""
        idx = nearest_code(z, self.codebook)
        return self.codebook[idx].permute(0, 3, 1, 2), idx

    def decode_latents(self, zq):
        """codes (B, D, h, w) -> frames, ~[0, 1] but unclamped (the training loss sees the
        raw output)."""
        return (self.decoder(zq) + 1) / 2

    def decode(self, z):
        """RIVER's decode: any latent (e.g. a flow-matching sample) -> nearest codes ->
        x in [0, 1]."""
        return self.decode_latents(self.quantize(z)[0]).clamp(0, 1)

    def forward(self, x):
        """-> reconstruction (unclamped), z_e, z_q (no grad) and code indices."""
        z = self.encode(x)
        zq, idx = self.quantize(z)
        # straight-through: decoder grads reach the encoder
        x_rec = self.decode_latents(z + (zq - z).detach())
        return x_rec, z, zq, idx


# ----------------------------------------------------------------------------- model, 3D (VideoGPT)
def cell_encoder(channels, width, latent_channels, cell):
    """z_e of each (dt, ds, ds) cell from that cell's pixels alone: a convolution with stride equal
    to its kernel, then a per-cell MLP."""
    return nn.Sequential(
        nn.Conv3d(channels, width, cell, cell),
        nn.ReLU(),
        nn.Conv3d(width, width, 1),
        nn.ReLU(),
        nn.Conv3d(width, latent_channels, 1),
    )


def conv_strides(downsample):
    """(dt, ds, ds) -> per-level strides: max(log2) stride-2 levels, each axis halved while it still
    has to shrink (VideoGPT's order: time and space together first)."""
    levels = [int(math.log2(d)) for d in downsample]
    return [tuple(2 if i < n else 1 for n in levels) for i in range(max(levels))]


class CausalConv3d(nn.Module):
    """Conv3d padded k - s on every axis: centred in space (the extra pixel in front, as VideoGPT),
    all in front in time, so an output frame never sees a later input frame."""

    def __init__(self, cin, cout, kernel, stride=(1, 1, 1)):
        super().__init__()
        kernel = (kernel,) * 3 if isinstance(kernel, int) else kernel
        self.conv = nn.Conv3d(cin, cout, kernel, stride)
        t, h, w = (k - s for k, s in zip(kernel, stride))
        self.pad = (w - w // 2, w // 2, h - h // 2, h // 2, t, 0)  # F.pad: last axis first

    def forward(self, x):
        return self.conv(F.pad(x, self.pad))


class FrameNorm(nn.GroupNorm):
    """GroupNorm of every frame on its own: statistics over channels and pixels, never over time,
    so the encoder stays causal."""

    def forward(self, x):
        B, C, T, H, W = x.shape
        y = super().forward(x.transpose(1, 2).reshape(B * T, C, H, W))
        return y.view(B, T, C, H, W).transpose(1, 2)


class AxialAttention(nn.Module):
    """VideoGPT's axial attention: the sum of three multi-head self-attentions, along time, rows
    and columns, each with its own projections and no position code. causal: time is masked, so a
    latent frame sees no later one."""

    def __init__(self, c, heads=2, causal=False):
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.qkv = nn.ModuleList(nn.Linear(c, 3 * c) for _ in range(3))
        self.proj = nn.ModuleList(nn.Linear(c, c) for _ in range(3))

    def forward(self, x):
        h = x.movedim(1, -1)  # (B, T, H, W, C)
        out = torch.zeros_like(h)
        for axis, (qkv, proj) in enumerate(zip(self.qkv, self.proj), start=1):
            y = h.movedim(axis, -2)  # the attended axis next to the channels
            q, k, v = qkv(y).unflatten(-1, (3, self.heads, -1)).movedim(-4, -2).unbind(-4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and axis == 1)
            out = out + proj(a.movedim(-3, -2).flatten(-2)).movedim(-2, axis)
        return out.movedim(-1, 1)


class AxialResBlock(nn.Module):
    """VideoGPT's residual unit: x + attn(relu(norm(conv1(relu(norm(conv3(relu(norm(x))))))))),
    the 3x3x3 conv to half the channels."""

    def __init__(self, c, attention=True, causal=False):
        super().__init__()
        conv3 = CausalConv3d(c, c // 2, 3) if causal else nn.Conv3d(c, c // 2, 3, padding=1)
        attn = AxialAttention(c, causal=causal) if attention else nn.Identity()
        self.body = nn.Sequential(
            FrameNorm(math.gcd(8, c), c),
            nn.ReLU(),
            conv3,
            FrameNorm(math.gcd(8, c // 2), c // 2),
            nn.ReLU(),
            nn.Conv3d(c // 2, c, 1),
            FrameNorm(math.gcd(8, c), c),
            nn.ReLU(),
            attn,
        )

    def forward(self, x):
        return x + self.body(x)


class FrameResBlock(nn.Module):
    """x + conv(relu(conv(relu(x)))) with 1x3x3 convolutions, frame by frame: capacity at every
    strided level of encoder and decoder, where narrow layers alone give blurred strokes."""

    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv3d(c, c, (1, 3, 3), padding=(0, 1, 1)),
            nn.ReLU(),
            nn.Conv3d(c, c, (1, 3, 3), padding=(0, 1, 1)),
        )

    def forward(self, x):
        return x + self.body(x)


def videogpt_encoder(channels, widths, strides, latent_channels, attention, res_blocks=2):
    """VideoGPT's encoder, causal in time: a strided 4x4x4 conv and a residual unit per level, a
    3x3x3 conv, axial-attention residual units, a 1x1x1 conv to the latent channels."""
    down = []
    for cin, cout, s in zip([channels, *widths], widths, strides):
        down += [CausalConv3d(cin, cout, 4, s), FrameResBlock(cout), nn.ReLU()]
    top = widths[-1]
    return nn.Sequential(
        *down,
        CausalConv3d(top, top, 3),
        *(AxialResBlock(top, attention, causal=True) for _ in range(res_blocks)),
        FrameNorm(math.gcd(8, top), top),
        nn.ReLU(),
        nn.Conv3d(top, latent_channels, 1),
    )


class VQVAE3D(nn.Module):
    """VideoGPT's first stage: clips (B, T, C, H, W) -> codes on a (T/dt, H/ds, W/ds) grid -> clips.
    Strided 4x4x4 convs (ReLU), a 3x3x3 conv and axial-attention residual units; the decoder mirrors
    it with transposed convs. The encoder is causal in time (a deviation, see the docstring), so
    the codes of the first k*dt frames are the first k latent frames of any longer clip;
    local_codes: the cell encoder instead, whose codes see their own cells alone."""

    def __init__(
        self,
        channels=1,
        width=16,
        latent_channels=16,
        codebook_size=512,
        attention=True,
        temporal_downsample=4,
        spatial_downsample=8,
        res_blocks=2,
        local_codes=False,
    ):
        super().__init__()
        cell = (temporal_downsample, spatial_downsample, spatial_downsample)
        strides = conv_strides(cell)
        widths = [width * 2**i for i in range(len(strides))]
        top = widths[-1]
        if local_codes:
            self.encoder = cell_encoder(channels, top, latent_channels, cell)
        else:
            self.encoder = videogpt_encoder(
                channels, widths, strides, latent_channels, attention, res_blocks
            )
        up = []
        for cin, cout, s in reversed(list(zip([channels, *widths], widths, strides))):
            kernel = tuple(2 + si for si in s)  # 4 where it doubles, 3 where it keeps the size
            up += [
                FrameResBlock(cout),
                nn.ConvTranspose3d(cout, cin, kernel, s, padding=1),
                nn.ReLU(),
            ]
        self.decoder = nn.Sequential(
            nn.Conv3d(latent_channels, top, 3, padding=1),
            *(AxialResBlock(top, attention) for _ in range(res_blocks)),
            FrameNorm(math.gcd(8, top), top),
            nn.ReLU(),
            *up[:-1],  # no ReLU after the last: the output is linear
        )
        self.register_buffer("codebook", torch.zeros(codebook_size, latent_channels))
        self.register_buffer("ema_count", torch.zeros(codebook_size))
        self.register_buffer("ema_sum", torch.zeros(codebook_size, latent_channels))

    def encode(self, x):
        """x (B, T, C, H, W) in [0, 1] -> z_e (B, D, T/dt, H/ds, W/ds)."""
        return self.encoder(x.transpose(1, 2) * 2 - 1)

    def quantize(self, z):
        """-> nearest codes z_q (B, D, t, h, w) and their indices (B, t, h, w)."""
        idx = nearest_code(z, self.codebook)
        return self.codebook[idx].movedim(-1, 1), idx

    def decode_latents(self, zq):
        """codes (B, D, t, h, w) -> clips (B, T, C, H, W), ~[0, 1] but unclamped."""
        return ((self.decoder(zq) + 1) / 2).transpose(1, 2)

    def decode(self, z):
        """Any latent -> nearest codes -> clips in [0, 1]."""
        return self.decode_latents(self.quantize(z)[0]).clamp(0, 1)

    def forward(self, x):
        """-> reconstruction (unclamped), z_e, z_q (no grad) and code indices."""
        z = self.encode(x)
        zq, idx = self.quantize(z)
        x_rec = self.decode_latents(z + (zq - z).detach())
        return x_rec, z, zq, idx


def patch_discriminator(channels=3, width=32):
    """VQGAN/pix2pix PatchGAN: one real-vs-fake logit per overlapping patch."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 4, 2, 1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(width, 2 * width, 4, 2, 1),
        norm(2 * width),
        nn.LeakyReLU(0.2),
        nn.Conv2d(2 * width, 4 * width, 4, 1, 1),
        norm(4 * width),
        nn.LeakyReLU(0.2),
        nn.Conv2d(4 * width, 1, 4, 1, 1),
    )


# ----------------------------------------------------------------------------- method
def vq_losses(x, x_rec, z, zq, beta, kind="l1"):
    """Reconstruction + beta * commitment ||z_e - sg[e]||^2, reduced in fp32. There is no codebook
    term: with EMA updates the codes follow the encoder instead of being pulled by a gradient."""
    rec = (F.l1_loss if kind == "l1" else F.mse_loss)(x_rec.float(), x)
    return rec, beta * F.mse_loss(z.float(), zq.float())


def ema_update(ema_count, ema_sum, counts, sums, decay=0.99, eps=1e-5):
    """One EMA codebook step (van den Oord et al. 2017, App. A.1): N <- g N + (1-g) n,
    m <- g m + (1-g) sum(z), e = m / N with Laplace-smoothed N, so rarely used codes do not
    divide by ~0. counts (K,), sums (K, D): this batch's assignments. -> (N, m, codebook)."""
    ema_count = decay * ema_count + (1 - decay) * counts
    ema_sum = decay * ema_sum + (1 - decay) * sums
    n = ema_count.sum()
    smoothed = (ema_count + eps) / (n + len(ema_count) * eps) * n
    return ema_count, ema_sum, ema_sum / smoothed[:, None]


def encoder_samples(z, k, ddp=False):
    """z (B, D, [t,] h, w) -> its latent vectors (N, D) and k of them drawn at random; under DDP
    rank 0's draw is used everywhere, so all replicas make the same codebook changes."""
    flat = z.detach().float().movedim(1, -1).reshape(-1, z.shape[1])
    cand = flat[torch.randint(len(flat), (k,), device=flat.device)]
    if ddp:
        dist.broadcast(cand, 0)
    return flat, cand


@torch.no_grad()
def init_codebook(vq, z, ddp=False):
    """Codes start at encoder outputs of the first batch, not at random points far from the data."""
    cand = encoder_samples(z, len(vq.codebook), ddp)[1]
    vq.codebook.copy_(cand)
    vq.ema_sum.copy_(cand)
    vq.ema_count.fill_(1.0)


@torch.no_grad()
def update_codebook(vq, z, idx, decay, eps, dead_frac, ddp=False):
    """EMA step and restarts from the batch's z_e (B, D, h, w) and code indices. Under DDP the
    statistics are summed over ranks, so every replica keeps the same codebook.
    -> codes restarted."""
    K = len(vq.codebook)
    flat, cand = encoder_samples(z, K, ddp)
    onehot = F.one_hot(idx.flatten(), K).float()
    counts = onehot.sum(0)
    sums = onehot.t() @ flat
    if ddp:
        dist.all_reduce(counts)
        dist.all_reduce(sums)
    count, total, book = ema_update(vq.ema_count, vq.ema_sum, counts, sums, decay, eps)
    # Jukebox-style restarts: a code whose EMA usage fell below dead_frac * mean usage jumps to
    # a random encoder output with a mean-sized count: about log(dead_frac)/log(decay) steps to
    # win data again
    dead = count < dead_frac * count.mean()
    fresh = count.mean()
    book = torch.where(dead[:, None], cand, book)
    total = torch.where(dead[:, None], cand * fresh, total)
    count = torch.where(dead, fresh, count)
    vq.codebook.copy_(book)
    vq.ema_count.copy_(count)
    vq.ema_sum.copy_(total)
    return dead.sum().float()


def adaptive_gan_weight(rec_loss, g_loss, x_rec):
    """VQGAN's balance: scale the GAN gradient to the size of the reconstruction gradient, so one
    --gan-weight works across data and training stages. VQGAN measures both at the decoder's last
    weight; we measure them at the decoder's output, which never re-enters the
    (compiled, DDP) model."""
    g_rec = torch.autograd.grad(rec_loss, x_rec, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, x_rec, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4).detach()


def loss_names(args):
    """The terms train_step returns, in order: the GAN terms only with --gan-weight."""
    gan = ["gan_g", "gan_d"] if args.gan_weight > 0 else []
    return ["loss", "rec", "commit", *gan, "restarts"]


def train_step(model, raw, disc, disc_ddp, opt, opt_d, scaler, x, step, args, rt):
    """One step on the frames x: the autoencoder (reconstruction + commitment, plus the adaptive
    GAN term once step >= --gan-start), then the discriminator, then the EMA codebook.
    model: the compiled/DDP-wrapped raw; disc/opt_d None without --gan-weight. -> loss_names()."""
    with rt.amp:
        x_rec, z, zq, idx = model(x)
    rec, commit = vq_losses(x, x_rec, z, zq, args.beta, args.recon_loss)
    loss = rec + commit
    g_loss = torch.zeros((), device=rt.device)
    d_loss = torch.zeros((), device=rt.device)
    gan_on = disc is not None and step >= args.gan_start
    if gan_on:  # generator side: the frozen, unwrapped disc, so DDP's hooks on it stay quiet
        disc.requires_grad_(False)
        with rt.amp:
            g_loss = -disc(x_rec).float().mean()
        disc.requires_grad_(True)
        loss = loss + args.gan_weight * adaptive_gan_weight(rec, g_loss, x_rec) * g_loss
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if args.grad_clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip)
    scaler.step(opt)
    if gan_on:  # hinge loss on real frames and detached reconstructions
        opt_d.zero_grad(set_to_none=True)
        with rt.amp:
            real, fake = disc_ddp(torch.cat([x, x_rec.detach()])).float().chunk(2)
        d_loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
        scaler.scale(d_loss).backward()
        scaler.step(opt_d)
    # one scaler update after both optimiser steps (not optimizer_step): both used the same scale
    scaler.update()
    restarts = update_codebook(
        raw, z, idx, args.ema_decay, args.ema_eps, args.dead_code_frac, rt.ddp
    )
    gan = [g_loss, d_loss] if disc is not None else []
    return torch.stack([t.detach() for t in [loss, rec, commit, *gan, restarts]])


class Exported(nn.Module):
    """One method of a module as `forward`, so torch.export can trace it."""

    def __init__(self, module, method):
        super().__init__()
        self.module = module
        self.method = method

    def forward(self, x):
        return getattr(self.module, self.method)(x)


def export_first_stage(model, out_dir, meta):
    """Write first_stage_{encode,decode}.pt2 (fp32, CPU, dynamic batch) and first_stage.json."""
    vq = copy.deepcopy(model).float().cpu().eval()
    frames = [meta["frames"]] if "temporal_downsample" in meta else []  # clips in 3D
    x = torch.rand(2, *frames, meta["channels"], meta["resolution"], meta["resolution"])
    batch = torch.export.Dim("batch", min=1, max=65536)
    for name, inp in [("encode", x), ("decode", vq.encode(x))]:
        program = torch.export.export(Exported(vq, name), (inp,), dynamic_shapes=({0: batch},))
        torch.export.save(program, os.path.join(out_dir, f"first_stage_{name}.pt2"))
    write_json(os.path.join(out_dir, "first_stage.json"), meta)


# ----------------------------------------------------------------------------- data
def resolve_data(args):
    """--data-dir implies its kind when --data is left at its default (toy_data.data_kind); with
    another generated kind it stops with one line instead of being ignored."""
    try:
        args.data = toy_data.data_kind(args.data, args.data_dir, Args.data)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")


def load_clips(args, n_clips, split, rank=0, world=1):
    """Generate clips once into a uint8 (N, T, C, H, W) tensor;
    rank r keeps clips r, r+world, ..."""
    try:
        ds = toy_data.make_dataset(
            args.data, n_clips, args.resolution, args.frames, args.seed, split, args.data_dir
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


def draw_batch(pool, gen, batch_size, device):
    """Random frames of the uint8 pool (N, C, H, W), drawn with replacement, as floats in [0, 1]."""
    return pool[torch.randint(len(pool), (batch_size,), generator=gen)].to(device).float() / 255


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, clips, args, rt, batch=64):
    """Reconstruct held-out clips frame by frame -> (scores, reconstructions, z_e of clip 0).
    PSNR/SSIM on clamped [0, 1] frames; codebook usage = fraction of codes used at least once;
    perplexity = exp(entropy of the code histogram); z_e mean/std per channel."""
    if args.temporal_downsample > 1:
        return evaluate_clips(model, clips, args, rt)
    model.eval()
    frames = clips.flatten(0, 1)
    recs = []
    zs = []
    idxs = []
    rec_loss = 0.0
    t0 = time.perf_counter()
    for i in range(0, len(frames), batch):
        x = frames[i : i + batch].to(rt.device).float() / 255
        with rt.amp:
            x_rec, z, zq, idx = model(x)
        rec, commit = vq_losses(x, x_rec, z, zq, args.beta, args.recon_loss)
        rec_loss += float(rec + commit) * len(x)
        recs.append(x_rec.float().clamp(0, 1).cpu())
        zs.append(z.float().cpu())
        idxs.append(idx.cpu())
    fps = len(frames) / (time.perf_counter() - t0)
    model.train()
    rec = torch.cat(recs).view(clips.shape)
    z = torch.cat(zs)
    idx = torch.cat(idxs)
    target = clips.float() / 255
    p = torch.bincount(idx.flatten(), minlength=model.codebook.shape[0]).double()
    p /= p.sum()
    scores = {
        "psnr": metrics.psnr(rec, target),
        "ssim": metrics.ssim(rec, target),
        "mse": metrics.mse(rec, target),
        "loss": rec_loss / len(frames),
        "codebook_usage": float((p > 0).double().mean()),
        "perplexity": float(torch.exp(-(p * p.clamp_min(1e-30).log()).sum())),
        "latent_mean": z.mean((0, 2, 3)).tolist(),
        "latent_std": z.std((0, 2, 3)).tolist(),
        "latent_std_global": float(z.std()),
        "recon_frames_per_s": fps,
    }
    return scores, rec, z[: clips.shape[1]]


@torch.no_grad()
def evaluate_clips(model, clips, args, rt, batch=4):
    """evaluate() for the spatio-temporal VQ-VAE: whole clips in, the same scores out; the latents
    returned are clip 0's code frames (t, D, h, w)."""
    model.eval()
    recs = []
    zs = []
    idxs = []
    rec_loss = 0.0
    t0 = time.perf_counter()
    for i in range(0, len(clips), batch):
        x = clips[i : i + batch].to(rt.device).float() / 255
        with rt.amp:
            x_rec, z, zq, idx = model(x)
        rec, commit = vq_losses(x, x_rec, z, zq, args.beta, args.recon_loss)
        rec_loss += float(rec + commit) * len(x)
        recs.append(x_rec.float().clamp(0, 1).cpu())
        zs.append(z.float().cpu())
        idxs.append(idx.cpu())
    fps = clips.shape[0] * clips.shape[1] / (time.perf_counter() - t0)
    model.train()
    rec = torch.cat(recs)
    z = torch.cat(zs)
    target = clips.float() / 255
    p = torch.bincount(torch.cat(idxs).flatten(), minlength=model.codebook.shape[0]).double()
    p /= p.sum()
    scores = {
        "psnr": metrics.psnr(rec, target),
        "ssim": metrics.ssim(rec, target),
        "mse": metrics.mse(rec, target),
        "loss": rec_loss / len(clips),
        "codebook_usage": float((p > 0).double().mean()),
        "perplexity": float(torch.exp(-(p * p.clamp_min(1e-30).log()).sum())),
        "latent_mean": z.mean((0, 2, 3, 4)).tolist(),
        "latent_std": z.std((0, 2, 3, 4)).tolist(),
        "latent_std_global": float(z.std()),
        "recon_frames_per_s": fps,
    }
    return scores, rec, z[0].transpose(0, 1)


def resize_baseline_3d(clips, dt, ds):
    """resize_baseline for the spatio-temporal grid: each cell averages dt frames of ds x ds
    pixels, enlarged back trilinearly."""
    target = clips.float().transpose(1, 2) / 255  # (N, C, T, H, W)
    small = F.avg_pool3d(target, (dt, ds, ds))
    blurred = F.interpolate(small, scale_factor=(dt, ds, ds), mode="trilinear").clamp(0, 1)
    blurred = blurred.transpose(1, 2)
    target = target.transpose(1, 2)
    return {
        "psnr": metrics.psnr(blurred, target),
        "ssim": metrics.ssim(blurred, target),
        "mse": metrics.mse(blurred, target),
    }


def resize_baseline(clips, temporal_downsample=1, spatial_downsample=8):
    """The frames shrunk to the latent grid (area average, full colour: 3 numbers per cell
    where the VQ-VAE keeps one code of 4) and enlarged back (bilinear): what a reconstruction
    from that many cells gets without learning anything -> psnr, ssim, mse on the same frames."""
    if temporal_downsample > 1:
        return resize_baseline_3d(clips, temporal_downsample, spatial_downsample)
    target = clips.float().flatten(0, 1) / 255
    small = F.avg_pool2d(target, 8)
    blurred = F.interpolate(small, scale_factor=8.0, mode="bilinear").clamp(0, 1)
    blurred = blurred.view(clips.shape)
    target = target.view(clips.shape)
    return {
        "psnr": metrics.psnr(blurred, target),
        "ssim": metrics.ssim(blurred, target),
        "mse": metrics.mse(blurred, target),
    }


def save_samples(clips, rec, z0, out_dir, step, writer):
    """original | reconstruction side by side, as GIF + PNG strip, in samples/ and TensorBoard."""
    pairs = torch.cat([clips[:4].float() / 255, rec[:4]], dim=-1)  # (n, T, C, H, 2W)
    captions = ["original | recon"] * len(pairs)
    samples = os.path.join(out_dir, "samples")
    viz.save_video_grid(pairs, os.path.join(samples, f"recon_{step:06d}.gif"), captions, fps=4)
    viz.save_video_grid(pairs[:, :8], os.path.join(samples, "recon_latest.png"), captions)
    viz.save_latent_picture(z0[:8], os.path.join(samples, "latent_latest.png"))
    viz.log_video(writer, "samples/original_vs_reconstruction", pairs, step, fps=4)
    pca = F.interpolate(viz.latent_to_rgb(z0), scale_factor=8.0)
    viz.log_video(writer, "samples/latent_pca", pca, step, fps=4)


def run_eval(raw, clips, args, rt, step, writer, tag="eval"):
    """Evaluate all held-out clips (rank 0): <tag>/ and perf/ scalars and one console line (tag
    "eval": val clips, "test": test clips)."""
    scores, rec, z0 = evaluate(raw, clips, args, rt)
    if writer:
        speeds = {k: v for k, v in scores.items() if k.endswith("_per_s")}
        log_scalars(writer, tag, {k: v for k, v in scores.items() if k not in speeds}, step)
        log_scalars(writer, "perf", speeds, step)
    print(
        f"{tag} step {step}: PSNR {scores['psnr']:.2f} dB  SSIM {scores['ssim']:.4f}  "
        f"usage {scores['codebook_usage']:.0%}  perplexity {scores['perplexity']:.0f}  "
        f"z_e std {scores['latent_std_global']:.2f}",
        flush=True,
    )
    return scores, rec, z0


def latent_stats(raw, args, rt):
    """Per-channel mean and std of z_e on training clips (the first --eval-clips of split
    'train'): RIVER normalises its latents with them, so they never come from held-out clips."""
    scores = evaluate(raw, load_clips(args, args.eval_clips, "train"), args, rt)[0]
    return {k: scores[k] for k in ("latent_mean", "latent_std")}


def first_stage_meta(args, channels, step, scores, stats, codebook=None):
    """first_stage.json: what train_river.py (and train_videogpt.py) need to use the exported
    programs."""
    latent = args.resolution // 8
    meta = {
        "script": SCRIPT,
        "data": args.data,
        "resolution": args.resolution,
        "channels": channels,
        "latent_shape": [args.latent_channels, latent, latent],
        "codebook_size": args.codebook_size,
        "input_range": [0, 1],
        "encode": "first_stage_encode.pt2",
        "decode": "first_stage_decode.pt2",
        "step": step,
        **stats,  # of training clips
        "eval": scores,
    }
    dt = args.temporal_downsample
    if dt > 1:  # VideoGPT's prior reads codes: it needs the grid and the codebook
        side = args.resolution // args.spatial_downsample
        shape = [args.latent_channels, args.frames // dt, side, side]
        meta.update(frames=args.frames, temporal_downsample=dt, latent_shape=shape)
        meta["codebook"] = codebook.float().cpu().tolist()
    return meta


def finish(raw, perf, step, args, rt, writer, t_start):
    """Final evaluation on test clips (rank 0): samples, metrics.json and the exported first
    stage."""
    clips = load_clips(args, args.eval_clips, "test")
    scores, rec, z0 = run_eval(raw, clips, args, rt, step, writer, "test")
    save_samples(clips, rec, z0, args.out_dir, step, writer)
    perf["recon_frames_per_s"] = scores.pop("recon_frames_per_s")
    data = {
        "kind": args.data,
        "resolution": args.resolution,
        "split": "test",
        "n_eval": clips.shape[0] * clips.shape[1],
    }
    report = {
        "script": SCRIPT,
        "step": step,
        "wall_s": round(time.time() - t_start, 1),
        "eval": scores,
        "baselines": {"resize_to_latent_grid": resize_baseline(clips, *grid_factors(args))},
        "perf": perf,
        "data": data,
    }
    write_json(os.path.join(args.out_dir, "metrics.json"), report)
    if args.export:
        stats = latent_stats(raw, args, rt)
        meta = first_stage_meta(args, clips.shape[2], step, scores, stats, raw.codebook)
        export_first_stage(raw, args.out_dir, meta)
    return report


def summary(report, args, trained):
    """The last line of a run: the headline figures and where every output is."""
    scores = report["eval"]
    base = report["baselines"]["resize_to_latent_grid"]
    files = "ckpt.pt, metrics.json, samples/, plots/, TensorBoard events" if trained else ""
    files = files or "metrics.json, samples/"
    files += ", first_stage_*.pt2 and first_stage.json" if args.export else ""
    return (
        f"held-out reconstruction: PSNR {scores['psnr']:.2f} dB (resized to the latent grid: "
        f"{base['psnr']:.2f}), SSIM {scores['ssim']:.4f} ({base['ssim']:.4f}), "
        f"codebook usage {scores['codebook_usage']:.0%}; in {args.out_dir}: {files} "
        f"(tensorboard --logdir {args.out_dir})"
    )


# ----------------------------------------------------------------------------- training loop
def model_arch(args, channels):
    """The model flags a checkpoint must match (written into it as "arch")."""
    return {
        "channels": channels,
        "width": args.width,
        "latent_channels": args.latent_channels,
        "codebook_size": args.codebook_size,
        "attention": args.attention,
    } | (spatio_temporal(args) if args.temporal_downsample > 1 else {})


def spatio_temporal(args):
    """The downsampling factors of the 3D VQ-VAE (in its arch only: a per-frame one has none)."""
    return {
        "temporal_downsample": args.temporal_downsample,
        "spatial_downsample": args.spatial_downsample,
        "local_codes": args.local_codes,
    }


def build_model(arch):
    """The per-frame VQ-VAE, or the spatio-temporal one when the arch has a temporal_downsample."""
    return (VQVAE3D if "temporal_downsample" in arch else VQVAE)(**arch)


def training_pool(args, rt):
    """This rank's training clips as single frames (N, C, H, W), or as whole clips (N, T, C, H, W)
    for the spatio-temporal VQ-VAE."""
    clips = load_clips(args, args.train_clips, "train", rt.rank, rt.world)
    return clips if args.temporal_downsample > 1 else clips.flatten(0, 1)


def grid_factors(args):
    """(temporal, spatial) downsampling of the latent grid."""
    return args.temporal_downsample, args.spatial_downsample


def pool_unit(args):
    """What a training example is: a frame, or a clip for the spatio-temporal VQ-VAE."""
    return "clips" if args.temporal_downsample > 1 else "frames"


def check_temporal(args):
    """--temporal-downsample: a power of 2 that divides --frames; --spatial-downsample: a power of
    2 from 2 up that divides --resolution, and 8 for the per-frame VQ-VAE."""
    dt = args.temporal_downsample
    ds = args.spatial_downsample
    if dt < 1 or dt & (dt - 1) or args.frames % dt:
        raise SystemExit(
            f"error: --temporal-downsample {dt} must be a power of 2 (1: per frame) that divides "
            f"--frames {args.frames}; use e.g. --temporal-downsample 4 --frames 16"
        )
    if ds < 2 or ds & (ds - 1) or args.resolution % ds or (dt == 1 and ds != 8):
        raise SystemExit(
            f"error: --spatial-downsample {ds} must be a power of 2 that divides --resolution "
            f"{args.resolution}, and 8 without --temporal-downsample (the per-frame VQ-VAE)"
        )
    if args.local_codes and dt == 1:
        raise SystemExit(
            "error: --local-codes is an encoder of the spatio-temporal VQ-VAE; add e.g. "
            "--temporal-downsample 2 --spatial-downsample 4"
        )


def checkpoint_path(args):
    """Check the flags before anything is written -> the checkpoint to resume or evaluate."""
    counts = ["steps", "batch_size", "train_clips", "eval_clips", "frames", "width"]
    check_counts(args, counts + ["log_every", "eval_every", "sample_every", "ckpt_every"])
    if args.resolution % 8 or args.resolution < 8:
        raise SystemExit(
            f"error: --resolution {args.resolution} is not a positive multiple of 8 (the encoder "
            "halves it 3 times); use e.g. 64"
        )
    check_temporal(args)
    path = args.ckpt or os.path.join(args.out_dir, "ckpt.pt")
    if args.ckpt and not os.path.isfile(args.ckpt):
        raise SystemExit(
            f"error: --ckpt {args.ckpt} does not exist; pass the path of a {SCRIPT} ckpt.pt"
        )
    if args.eval_only and not os.path.isfile(path):
        raise SystemExit(
            f"error: --eval-only needs a checkpoint but {path} does not exist; train first or "
            "pass --ckpt"
        )
    return path


def step_flops(raw, args, channels, rt):
    """FLOPs of one training forward + backward, for the speed meter's GFLOP/s and MFU."""
    frames = [args.frames] if args.temporal_downsample > 1 else []  # a batch of clips in 3D
    size = (args.batch_size, *frames, channels, args.resolution, args.resolution)
    x = torch.zeros(size, device=rt.device)

    def forward_backward():
        with rt.amp:
            x_rec, z, zq, _ = raw(x)
        sum(vq_losses(x, x_rec, z, zq, args.beta, args.recon_loss)).backward()

    flops = count_flops(forward_backward)
    raw.zero_grad(set_to_none=True)
    return flops


def training_state(raw, channels, ckpt, args, rt):
    """This rank's batch generator, Adam, the fp16 loss scaler and, with --gan-weight, the
    discriminator and its optimiser; restored from ckpt when resuming."""
    gen = torch.Generator().manual_seed(args.seed + 1000 * rt.rank)
    fused = rt.device.type == "cuda"
    opt = torch.optim.Adam(raw.parameters(), lr=args.lr, betas=(0.9, 0.99), fused=fused)
    scaler = make_scaler(rt)
    disc = None
    opt_d = None
    if args.gan_weight > 0:
        disc = patch_discriminator(channels, args.width).to(rt.device)
        opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.9))
    if ckpt:
        restore_training(ckpt, opt, scaler, disc, opt_d, gen, rt)
    return gen, opt, scaler, disc, opt_d


def restore_training(ckpt, opt, scaler, disc, opt_d, gen, rt):
    """Optimisers, loss scaler, discriminator and RNG states of a checkpoint (the model is already
    loaded). A discriminator is restored only if the checkpoint has one."""
    opt.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    if disc is not None and "disc" in ckpt:
        disc.load_state_dict(ckpt["disc"])
        opt_d.load_state_dict(ckpt["opt_d"])
    data_state = set_rng_state(ckpt["rng"], rt.rank)
    if data_state is not None:
        gen.set_state(data_state)


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
    resolve_data(args)
    ckpt_path = checkpoint_path(args)
    eval_clips = load_clips(args, args.eval_clips, "val")
    channels = eval_clips.shape[2]
    arch = model_arch(args, channels)
    ckpt = None
    if (args.resume or args.eval_only) and os.path.isfile(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, arch)
    raw = build_model(arch).to(rt.device)
    if ckpt:
        load_weights(raw, ckpt["model"], ckpt_path)
    if ckpt and not args.eval_only:
        check_resume(ckpt, args, ckpt_path)
    step = ckpt["step"] if ckpt else 0
    n_params = sum(p.numel() for p in raw.parameters())

    if args.eval_only:
        if rt.master:
            os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)
            perf = {"train_samples_per_s": None, "mfu": None, "params": n_params}
            report = finish(raw, perf, step, args, rt, None, time.time())
            print(summary(report, args, trained=False))
        teardown(rt)
        return

    # ---- training state
    pool = training_pool(args, rt)
    gen, opt, scaler, disc, opt_d = training_state(raw, channels, ckpt, args, rt)
    optimizers = [opt] if disc is None else [opt, opt_d]
    state = {"model": raw, "optimizer": opt, "scaler": scaler}  # what a checkpoint holds
    if disc is not None:
        state.update(disc=disc, opt_d=opt_d)
    if raw.ema_count.sum() == 0:
        with torch.no_grad(), rt.amp:
            x = draw_batch(pool, gen, args.batch_size, rt.device)
            init_codebook(raw, raw.encode(x), rt.ddp)
    flops = step_flops(raw, args, channels, rt)
    # update_codebook keeps codebooks equal on all ranks; DDP's buffer broadcast is a cheap extra
    model = wrap_ddp(torch.compile(raw) if rt.compile else raw, rt)
    disc_ddp = wrap_ddp(disc, rt) if disc is not None else None

    writer = None  # TensorBoard, rank 0 only
    if rt.master:
        writer = open_writer(args, step)
        print(
            f"train_vqvae: {n_params / 1e6:.2f}M params, {rt.device.type} {rt.dtype}, "
            f"compile {rt.compile}, world {rt.world}, {len(pool)} training {pool_unit(args)}"
            f"/rank of {args.data}, from step {step} to {args.steps}; outputs in {args.out_dir}",
            flush=True,
        )

    # ---- loop
    meter = LossMeter(loss_names(args), rt.device)
    ckpt_file = os.path.join(args.out_dir, "ckpt.pt")
    speed = SpeedMeter(step, peak_flops(rt))
    t_start = time.time()
    with Control(rt) as control:
        while step < args.steps:
            lr = lr_at(step, args.steps, args.lr, args.warmup_steps)
            set_lr(optimizers, lr)
            x = draw_batch(pool, gen, args.batch_size, rt.device)
            meter.add(train_step(model, raw, disc, disc_ddp, opt, opt_d, scaler, x, step, args, rt))
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
                run_eval(raw, eval_clips, args, rt, step, writer)
            if rt.master and more and step % args.sample_every == 0:
                _, rec, z0 = evaluate(raw, eval_clips[:4], args, rt)
                save_samples(eval_clips, rec, z0, args.out_dir, step, writer)
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
        perf = speed.summary(args.batch_size * rt.world)
        perf.update(params=n_params, device=device_name(rt), dtype=rt.dtype)
        report = finish(raw, perf, step, args, rt, writer, t_start)
        writer.close()
        curves = os.path.join(args.out_dir, "plots", "training_curves.png")
        viz.plot_training_curves(args.out_dir, curves)
        print(summary(report, args, trained=True))
    teardown(rt)


if __name__ == "__main__":
    run(main, tyro.cli(Args))
