r"""Self Forcing: a block-causal video diffusion model trained on its own KV-cached rollouts, DMD.

A small DiT writes prompted toy videos (32x32, 12 frames) in chunks of 3 frames, each denoised in
4 steps while it attends to a KV cache of the clean earlier chunks. Self Forcing trains it on its
*own* rollouts, made by the function used at inference (`rollout`), scored whole by distribution
matching distillation (DMD) against a bidirectional teacher: training sees the context inference
will see.
Stages (--stage; default all, in order; each writes ckpt_<stage>.pt and its metrics.json row):
teacher (flow matching, 10% null prompts for CFG); ode (the causal student, initialised from the
teacher, regresses its CFG ODE trajectories at the few-step sigmas); self_forcing (DMD on rollouts,
one random exit step with gradient, detached cache, frozen teacher with CFG as real score, 5 critic
updates per generator update); tf, df (the TF+DMD and DF+DMD ablation: one step per chunk from a
noised real chunk, real context).

Paper: Huang, Li, He, Zhou, Shechtman, "Self Forcing: Bridging the Train-Test Gap in Autoregressive
Video Diffusion" (2025); DMD: Yin et al. (2024); CausVid: Yin et al. (2025). Simplified: pixels, not
VAE latents (tokens read and write 16x16 windows at stride 8: no seams); word embeddings mapped
linearly, not umT5; a dense mask, not FlexAttention; no attention sinks; x0 prediction, not
velocity; TF/DF through the KV cache (same attention and gradients as a parallel mask); besides
RoPE, each frame's modulation carries its index counted from the first frame it sees (never past
the window, so no index is new past the training length). See --explain.
Data: toy_data's prompted shapes as steady clips (render_attrs steady=--frames): shapes move at one
speed around a torus, rotating shapes start upright and turn at one speed, gradients cycle; real
clips 2x and 4x as long follow the rules of the 12 frames trained on.

    python train_self_forcing.py                  # CPU: every stage, 39 min on 1 thread
    python train_self_forcing.py --generate "A red circle moving from left to right" --frames 48
    python train_self_forcing.py --width 256 --depth 8 --batch-size 64 \
        --teacher-steps 20000 --steps 1000        # GPU
    torchrun --standalone --nproc_per_node=2 train_self_forcing.py  # DDP (nccl CUDA, gloo CPU)

Outputs in --out-dir: ckpt_<stage>.pt, args.json, metrics.json ("eval": Self Forcing; "baselines":
teacher, ode, tf, df, real videos; fd_window_controls), samples/, plots/ (attention masks,
fd_window), TensorBoard events (train/ eval/ perf/ samples/ <stage>/*).
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
    stage: Literal["all", "teacher", "ode", "self_forcing", "tf", "df"] = "all"
    """stage to run: all (teacher, ode, self_forcing, tf, df in order) or one of them"""
    steps: int = 120
    """generator updates of the self_forcing stage, and of tf and df (the ablation gives each the
    same number)"""
    teacher_steps: int = 5000
    """flow-matching steps of the teacher"""
    ode_steps: int = 400
    """ODE-regression steps of the causal student"""
    seed: int = 0
    """random seed: model init, data sets, noise and batch order"""
    out_dir: str = "runs/train_self_forcing"
    """folder for ckpt_<stage>.pt, metrics.json, TensorBoard events, samples/ and plots/"""
    resume: bool = True
    """continue each stage from out_dir/ckpt_<stage>.pt when it exists (a finished stage is
    skipped)"""
    eval_only: bool = False
    """evaluate --ckpt, or every stage checkpoint in out_dir, write metrics.json, samples and plots,
    then exit"""
    ckpt: str | None = None
    """checkpoint to evaluate or generate with; None: every stage in out_dir (--generate:
    ckpt_self_forcing.pt)"""
    accept_changed_args: bool = False
    """resume even if flags that shape the run (steps, lr, batch size, data, ...) differ from the
    checkpoint's (the schedule then changes mid-run)"""
    generate: tuple[str, ...] = ()
    """prompts to generate, streaming chunk by chunk, --frames long, into out_dir/generated.gif,
    then exit"""
    explain: bool = False
    """print how the pieces of the method fit together, then exit"""
    log_every: int = 50
    """print and log training losses every N steps"""
    eval_every: int = 2500
    """held-out evaluation every N steps of a stage (and always at its end)"""
    sample_every: int = 1000
    """write sample GIFs every N steps of a stage"""
    ckpt_every: int = 250
    """write the stage checkpoint every N steps (and at the end, and on Ctrl-C or SIGTERM)"""
    # system
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto: CUDA if present, else CPU"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """autocast dtype; auto: bf16 on CUDA and bf16-capable CPUs, fp16 + GradScaler on older GPUs,
    else fp32"""
    compile: tyro.conf.DisallowNone[bool | None] = None
    """torch.compile the model; None (unset): on for CUDA, off otherwise"""
    # data
    data: str = "shapes"
    """data kind: shapes (the prompted toy videos; the only kind with prompts)"""
    data_dir: str | None = None
    """kept so every script takes the same flags: shapes reads no files, and a --data-dir (whose
    videos have no prompts) stops with one line"""
    resolution: int = 32
    """frame size in pixels (divisible by 8: a token per 8x8 patch, reading and writing the 16x16
    window around it)"""
    frames: int = 12
    """frames per video (a multiple of --chunk): the training length"""
    train_clips: int = 4096
    """prompted steady clips generated once into memory as the training pool (split 'train',
    HOLDOUT prompts removed)"""
    eval_clips: int = 128
    """evaluation clips: the HOLDOUT prompts (never trained on) in turn, each with a random layout,
    generated for and compared to"""
    # model
    width: int = 128
    """transformer width (heads of 32 dims)"""
    depth: int = 4
    """transformer blocks"""
    chunk: int = 3
    """frames per autoregressive chunk (denoised together, bidirectional inside, causal across)"""
    window: int = 9
    """student's attention window in frames, its own chunk included (0: all); below --frames, so
    training rolls"""
    # optim
    batch_size: int = 16
    """videos per batch per process (teacher, ODE regression; the DMD stages roll out half as
    many)"""
    lr: float = 1e-3
    """teacher peak learning rate (AdamW; ODE regression: lr/3), after 100 warm-up steps,
    cosine-decayed to lr/10"""
    gen_lr: float = 1e-4
    """learning rate of the DMD stages (AdamW betas (0, 0.999)): the generator's, constant after 10
    warm-up steps; the critic's, constant from its first update (no warm-up)"""
    # method
    shift: float = 5.0
    """timestep shift k of the sigma grid: sigma = k s / (1 + (k - 1) s)"""
    denoise_steps: int = 4
    """few-step schedule: uniform timesteps [1000, 750, 500, 250] warped through the shifted grid"""
    guidance: float = 1.0
    """classifier-free guidance of the teacher in x0 space: x0 = c + guidance (c - u) (real score,
    ODE pairs); the paper's 3 gives this small teacher holes and colour fringes"""
    critic_updates: int = 5
    """critic updates per generator update (dfake_gen_update_ratio)"""


STAGES = ("teacher", "ode", "self_forcing", "tf", "df")
DMD_STAGES = ("self_forcing", "tf", "df")
HOLDOUT = (  # never trained on
    "A red circle moving from left to right",
    "A blue square moving from top to bottom",
    "A yellow square rotating clockwise",
    "A green triangle moving from bottom right to top left",
    "Color gradient transitioning from cyan to orange",
    "An orange circle moving from right to left",
    "A white ball bouncing",
)
VOCAB = ["<null>"] + sorted(
    {
        *"a an moving from to rotating color gradient transitioning ball bouncing".split(),
        *toy_data.COLORS,
        *toy_data.SHAPES,
        *(w for d in toy_data.DIRECTIONS for w in d.split("_")),
        *toy_data.ROTATIONS,
    }
)
MAX_WORDS = 10  # "An orange triangle moving from bottom right to top left"
PATCH = 8
ODE_EULER = 16  # Euler steps of the teacher's ODE (ODE pairs, teacher samples)
ODE_PAIRS = 512
EMA_DECAY = 0.99  # the paper's
GRAD_CLIP = 10.0  # the paper's


def encode_prompt(prompt):
    """'A red circle ...' -> MAX_WORDS word ids (0 pads; all zeros is the null prompt). Unknown
    words stop the script."""
    words = prompt.strip().rstrip(".").lower().split()
    bad = [w for w in words if w not in VOCAB]
    if bad or len(words) > MAX_WORDS:
        why = f"unknown word(s) {', '.join(bad)}" if bad else f"more than {MAX_WORDS} words"
        raise SystemExit(
            f"error: prompt {prompt!r}: {why}; the vocabulary is: {' '.join(VOCAB[1:])}"
        )
    return [VOCAB.index(w) for w in words] + [0] * (MAX_WORDS - len(words))


# ----------------------------------------------------------------------------- model
def frame_mask(frames, chunk, window=0, device=None, cached=0):
    """Block-causal attention by frame, True where visible: a query in chunk b sees the keys of
    frames [end - window, end), end = the end of chunk b (window 0: from frame 0); the keys start
    with `cached` earlier frames (a KV cache). -> (frames, cached + frames)"""
    end = cached + (torch.arange(frames, device=device) // chunk + 1) * chunk
    f = torch.arange(cached + frames, device=device)
    return (f[None] < end[:, None]) & (f[None] >= (end[:, None] - window if window else 0))


def attention(q, k, v, mask):
    """Softmax attention, mask True where a query may look; written out with gradient (CPU SDPA's
    backward is slow here: a training step ~1.3x faster), SDPA without."""
    if not torch.is_grad_enabled():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    a = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    if mask is not None:
        a = a.masked_fill(~mask, -math.inf)
    return a.softmax(-1) @ v


def rope(u, cos, sin):
    """RoPE: turn dims [0, 2r) of each head (r = cos.shape[-1]) by the angles; the rest pass."""
    r = cos.shape[-1]
    a = u[..., :r]
    b = u[..., r : 2 * r]
    return torch.cat([a * cos - b * sin, a * sin + b * cos, u[..., 2 * r :]], -1)


class Block(nn.Module):
    """adaLN-Zero block, per-frame modulation; attention over its frames plus cached keys/values of
    earlier frames. 3D RoPE (Wan's): half of each head's dims turn with the frame index, a quarter
    each with the patch row and column."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.n1 = nn.LayerNorm(d, elementwise_affine=False)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.n2 = nn.LayerNorm(d, elementwise_affine=False)
        self.mod = nn.Linear(d, 6 * d)
        self.mlp = nn.Sequential(
            nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d)
        )
        nn.init.zeros_(self.mod.weight)  # every block starts as the identity
        nn.init.zeros_(self.mod.bias)

    def forward(self, x, c, cos, sin, mask, kv):
        B, T, N, D = x.shape
        # (B, T, 1, D) each: one set per frame
        sh1, sc1, g1, sh2, sc2, g2 = self.mod(c).unsqueeze(2).chunk(6, -1)
        qkv = self.qkv(self.n1(x) * (1 + sc1) + sh1)
        q, k, v = qkv.view(B, T * N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        # keys are turned to their absolute place before they are cached
        q = rope(q, cos, sin).to(v.dtype)
        k = rope(k, cos, sin).to(v.dtype)
        new = (k, v)  # this call's keys/values, for the caller's cache
        if kv is not None:
            k = torch.cat([kv[0], k], 2)
            v = torch.cat([kv[1], v], 2)
        h = attention(q, k, v, mask)
        x = x + g1 * self.proj(h.transpose(1, 2).reshape(B, T, N, D))
        return x + g2 * self.mlp(self.n2(x) * (1 + sc2) + sh2), new


def visible_index(frames, kv, mask, tokens, device):
    """Each frame's index counted from the first frame it sees: cached frames come first, then the
    call's own; mask (frames, cached + frames) or None (every key visible). -> (frames,) float"""
    cached = kv[0][0].shape[2] // tokens if kv else 0
    first = mask.int().argmax(1) if mask is not None else 0
    return (cached + torch.arange(frames, device=device) - first).float()


class DiT(nn.Module):
    """One transformer for every role: teacher, critic (no mask: bidirectional), causal student in
    parallel (frame mask) or chunk by chunk (kv: the cache of earlier chunks). Noisy frames, a noise
    level per frame, word ids -> x0. Each frame is modulated by its noise level, the prompt and its
    index counted from the first frame it can see (sin-cos): the frame index itself in a
    bidirectional clip and in a student's first window, and at most window - 1 once the window
    rolls, so frames past the training length carry indices seen in training. The RoPE of
    attention turns by the absolute index, which only enters as differences."""

    def __init__(
        self,
        channels=3,
        resolution=32,
        patch=8,
        width=128,
        depth=4,
        chunk=3,
        window=9,
        vocab=len(VOCAB),
        words=MAX_WORDS,
    ):
        super().__init__()
        self.patch = patch
        self.chunk = chunk
        self.window = window
        side = resolution // patch
        self.tokens = side**2
        self.inp = nn.Linear(channels * 4 * patch * patch, width)  # overlapping 2p x 2p at stride p
        rc = torch.stack([torch.arange(self.tokens) // side, torch.arange(self.tokens) % side], 1)
        # fixed 2D sin-cos (DiT), as loud as a noisy patch (learned 0.02 ones drown)
        a = rc[:, :, None] * 100.0 ** -(torch.arange(width // 4) / (width // 4))
        self.register_buffer(
            "space", torch.cat([a.sin(), a.cos()], -1).flatten(1), persistent=False
        )
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.frame = nn.Linear(width, width)  # index from the first visible frame: where "now" is
        self.word = nn.Embedding(vocab, 32)
        self.word_pos = nn.Parameter(0.02 * torch.randn(words, 32))
        # linear in the words (by slot): an unseen prompt is a sum of seen parts
        self.text = nn.Linear(words * 32, width)
        self.blocks = nn.ModuleList(Block(width, width // 32) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.final_mod = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, channels * 4 * patch * patch)  # 2p x 2p, summed on overlaps
        for layer in (self.final_mod, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        # RoPE: the frame turns 16 of a head's 32 dims, the patch row and column 8 each
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(8) / 8), persistent=False)
        space_ang = (rc[:, :, None] * 10.0 ** -(torch.arange(4) / 4)).flatten(1)
        self.register_buffer("space_ang", space_ang, persistent=False)

    def forward(self, x, sigma, words, pos=0, mask=None, kv=None):
        """x (B, T, C, H, W), sigma (B, T), words (B, MAX_WORDS); pos: absolute index of the first
        frame (RoPE); mask: (T, K) frame mask or None; kv: per block (K, V) of earlier frames or
        None. -> x0, per block (K, V) of x."""
        B, T, C, H, W = x.shape
        p = self.patch
        half = self.time[0].in_features // 2
        patches = F.unfold(x.reshape(B * T, C, H, W), 2 * p, padding=p // 2, stride=p)
        h = self.inp(patches.transpose(1, 2)).view(B, T, self.tokens, -1) + self.space
        text = self.text((self.word(words) + self.word_pos).flatten(1))
        k = torch.arange(half, device=x.device) / half
        when = (pos + torch.arange(T, device=x.device)).float()[:, None]  # absolute frames
        t = 1000 * sigma.float()[..., None] * torch.exp(-math.log(10000) * k)
        seen = visible_index(T, kv, mask, self.tokens, x.device)[:, None]  # not absolute
        f = seen * torch.exp(-math.log(1000) * k)
        t_emb = self.time(torch.cat([t.cos(), t.sin()], -1))
        f_emb = self.frame(torch.cat([f.cos(), f.sin()], -1))
        c = F.silu(t_emb + text[:, None] + f_emb)  # (B, T, D)
        # (T * tokens, 16) angles: frame, row, column; once, not per block
        frame_ang = (when * self.inv_freq).repeat_interleave(self.tokens, 0)
        ang = torch.cat([frame_ang, self.space_ang.repeat(T, 1)], 1)
        if mask is not None:  # frames -> tokens
            mask = mask.repeat_interleave(self.tokens, 0).repeat_interleave(self.tokens, 1)
        cos = ang.cos()
        sin = ang.sin()
        new = []
        for i, block in enumerate(self.blocks):
            h, block_kv = block(h, c, cos, sin, mask, kv[i] if kv else None)
            new.append(block_kv)
        sh, sc = self.final_mod(c).unsqueeze(2).chunk(2, -1)
        out = self.out(self.norm(h) * (1 + sc) + sh).view(B * T, self.tokens, -1).transpose(1, 2)
        x0 = F.fold(out.float(), (H, W), 2 * p, padding=p // 2, stride=p)  # no seams at patch edges
        return x0.view(B, T, C, H, W), new


# ---------------------------------------------------------------- method: schedule and losses
def shift_sigma(s, shift):
    """The shifted sigma grid: more of the steps at high noise."""
    return shift * s / (1 + (shift - 1) * s)


def few_step_sigmas(steps=4, shift=5.0):
    """warp_denoising_step: timesteps [1000, 750, 500, 250] looked up in the shifted grid:
    [1000, 937.5, 833.3, 625]."""
    timesteps = torch.linspace(1000, 0, steps + 1)[:-1].round().long()
    return shift_sigma(torch.linspace(1, 0, 1001)[1000 - timesteps], shift)


def sample_sigma(n, shift, gen, device, lo=0.0, hi=1.0):
    """sigma of a random grid entry (t ~ U{0..999} then shifted), clamped to [lo, hi]; (n,)."""
    t = torch.randint(1000, (n,), generator=gen, device=device)
    return shift_sigma(torch.linspace(1, 0, 1001, device=device)[t], shift).clamp(lo, hi)


def predict_x0(model, x, sigma, words, pos=0, mask=None, kv=None):
    """The clean video in fp32; sigma: a number, (B,) or (B, T). -> x0, this call's keys/values.
    The network predicts x0, not the velocity v = (x_t - x0) / sigma: with 8x8x3-pixel tokens
    wider than the model, v (mostly noise) cannot pass."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[:2])
    elif sigma.ndim == 1:
        sigma = sigma[:, None].expand(x.shape[:2])
    x0, new = model(x, sigma, words, pos, mask, kv)
    return x0.float(), new


def cfg_x0(model, x, sigma, words, guidance):
    """Classifier-free guidance in x0 space, conditional and null prompt in one batch:
    c + g (c - u)."""
    sigma = sigma.repeat(2) if torch.is_tensor(sigma) else sigma
    both = torch.cat([words, torch.zeros_like(words)])
    c, u = predict_x0(model, torch.cat([x, x]), sigma, both)[0].chunk(2)
    return c + guidance * (c - u)


def flow_matching_loss(model, x0, words, sigma, noise):
    """Teacher and critic: mean ||x0_hat(x_t) - x0||^2 at x_t = (1 - sigma) x0 + sigma noise,
    sigma (B,): flow matching's velocity loss weighted by sigma^2."""
    xt = x0 + sigma.view(-1, 1, 1, 1, 1) * (noise - x0)
    return F.mse_loss(predict_x0(model, xt, sigma, words)[0], x0)


def dmd_loss(x, teacher, critic, words, sigma, noise, guidance):
    """DMD on whole videos x: noise x to sigma (one per video); the frozen teacher with CFG (real
    score) and the critic (fake score) denoise it; g = (x0_fake - x0_real) / mean|x - x0_real|.
    -> 0.5 mse(x, sg(x - g)), gradient g/numel, and g."""
    with torch.no_grad():
        xt = x.detach() + sigma.view(-1, 1, 1, 1, 1) * (noise - x.detach())
        x0_real = cfg_x0(teacher, xt, sigma, words, guidance)
        x0_fake = predict_x0(critic, xt, sigma, words)[0]
        norm = (x.detach() - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        g = torch.nan_to_num((x0_fake - x0_real) / norm)
    return 0.5 * F.mse_loss(x.double(), (x.double() - g.double()).detach()), g


def sample_exit_step(gen, n, device, ddp=False):
    """The one denoising step (0..n-1) at which every chunk of this rollout exits with gradient;
    rank 0's draw."""
    s = torch.randint(n, (1,), generator=gen, device=device)
    if ddp:
        dist.broadcast(s, 0)
    return int(s)


# ----------------------------------------------------------------------------- method: sampling
def rollout(model, noise, words, sigmas, gen, exit_step=None, real=None, cache=True, on_step=None):
    """THE few-step AR sampler, for inference (exit_step None, under no_grad) and training. Per
    chunk: predict x0, re-noise it to the next sigma with fresh noise (gen), repeat; then run the
    clean x0 once at t = 0 and cache its keys and values, detached, keeping the last window - chunk
    frames. cache=False recomputes the prefix at every step: the same output at quadratic cost.
    cache="window" (the paper's baseline without a cache) runs the window's clean frames once per
    chunk, those frames seeing only each other: close to the cache's output, not equal.
    Self Forcing: only step exit_step has gradient; its x0 is the chunk. real = (video, tf): TF/DF,
    one step from the real chunk noised to a random few-step sigma, the real chunk cached clean (TF)
    or noised (DF) with gradient. on_step(b, j, x0)"""
    c = model.chunk
    chunks = noise.shape[1] // c
    keep = (model.window - c) * model.tokens if model.window else math.inf  # window - chunk frames
    grad = torch.is_grad_enabled()
    kv = []
    outs = []
    ahead = None  # this chunk's first x0, made along with the last chunk's context pass
    for b in range(chunks):
        x = noise[:, b * c : (b + 1) * c]
        if cache == "window":
            kv = window_context(model, outs, words, b)
        if real is not None:
            x0, context, context_sigma = real_chunk_x0(model, x, real, words, sigmas, gen, b, kv)
        for j, sigma in enumerate(sigmas.tolist() if real is None else ()):  # the few-step sampler
            with torch.set_grad_enabled(grad and j == exit_step):  # the one forward with gradient
                if j == 0 and ahead is not None:
                    x0 = ahead
                else:
                    x0 = chunk_x0(model, x, sigma, words, b, kv, outs, cache)
            if on_step:
                on_step(b, j, x0)
            if j == len(sigmas) - 1 or j == exit_step:
                context = x0.detach()
                context_sigma = 0.0
                break
            nxt = float(sigmas[j + 1])
            x = (1 - nxt) * x0 + nxt * torch.randn(x0.shape, generator=gen, device=x0.device)
        outs.append(x0)
        if cache is True and b < chunks - 1:  # the context pass: later chunks see clean context
            # inference: the next chunk's first step rides along (one call fewer, same x0)
            fuse = not grad and real is None
            ahead_noise = noise[:, (b + 1) * c : (b + 2) * c] if fuse else None
            with torch.set_grad_enabled(grad and real is not None):
                kv, ahead = cache_context(
                    model, context, context_sigma, words, b, kv, keep, ahead_noise, sigmas
                )
    return torch.cat(outs, 1)


def chunk_x0(model, x, sigma, words, b, kv, outs, cache):
    """One denoising step of chunk b: attending to the KV cache of earlier chunks, or (cache=False)
    recomputing the clean prefix (outs) under the block-causal mask."""
    c = model.chunk
    if cache:
        return predict_x0(model, x, sigma, words, b * c, kv=kv)[0]
    B = x.shape[0]
    sig = torch.cat([torch.zeros(B, b * c), torch.full((B, c), sigma)], 1).to(x.device)
    prefix = torch.cat([o.detach() for o in outs] + [x], 1)
    mask = frame_mask((b + 1) * c, c, model.window, x.device)
    return predict_x0(model, prefix, sig, words, mask=mask)[0][:, -c:]


def window_context(model, outs, words, b):
    """Keys and values of chunk b's window without a cache: its clean earlier frames (at most
    window - chunk) run at t = 0 under the block-causal mask, from scratch."""
    c = model.chunk
    if b == 0:
        return []
    start = max(0, b * c - (model.window - c)) if model.window else 0
    context = torch.cat([o.detach() for o in outs], 1)[:, start:]
    mask = frame_mask(context.shape[1], c, model.window, context.device)
    return predict_x0(model, context, 0.0, words, start, mask)[1]


def real_chunk_x0(model, x, real, words, sigmas, gen, b, kv):
    """TF/DF: chunk b of the real video noised (with noise x) to a random few-step sigma, denoised
    in one step. -> x0, the context to cache (TF: the clean real chunk; DF: the noised one) and its
    sigma."""
    c = model.chunk
    video, teacher_forcing = real
    frames = slice(b * c, (b + 1) * c)
    sig = sigmas.to(x.device)[
        torch.randint(len(sigmas), (x.shape[0],), generator=gen, device=x.device)
    ]
    x = (1 - sig.view(-1, 1, 1, 1, 1)) * video[:, frames] + sig.view(-1, 1, 1, 1, 1) * x
    x0 = predict_x0(model, x, sig, words, b * c, kv=kv)[0]
    if teacher_forcing:
        return x0, video[:, frames], 0.0
    return x0, x, sig


def cache_context(model, context, context_sigma, words, b, kv, keep, ahead_noise, sigmas):
    """Run chunk b's context at context_sigma and add its keys/values to the cache (per block),
    keeping the last `keep` tokens (the rolling cache). ahead_noise: also make the next chunk's
    first step in the same call. -> the cache, the next chunk's first x0 (or None)."""
    c = model.chunk
    B = context.shape[0]
    mask = None
    if ahead_noise is not None:
        first = float(sigmas[0])
        context = torch.cat([context, ahead_noise], 1)
        context_sigma = torch.tensor([0.0] * c + [first] * c, device=context.device).expand(B, -1)
        cached = kv[0][0].shape[2] // model.tokens if kv else 0
        mask = frame_mask(2 * c, c, model.window, context.device, cached)
    out, new = predict_x0(model, context, context_sigma, words, b * c, mask, kv)
    new = [tuple(t[:, :, : c * model.tokens] for t in kn) for kn in new]  # keep the context's
    if kv:
        new = [tuple(torch.cat([o, n], 2) for o, n in zip(old, kn)) for old, kn in zip(kv, new)]
    kv = [tuple(t[:, :, max(0, t.shape[2] - keep) :] for t in kn) for kn in new]
    return kv, (out[:, c:] if ahead_noise is not None else None)


@torch.no_grad()
def sample_teacher(model, noise, words, steps, shift, guidance, keep=(), shown=""):
    """Euler on the probability-flow ODE over the shifted grid with CFG, all frames at once.
    -> x0, states at steps in keep. shown: print the progress under this name."""
    sig = shift_sigma(torch.linspace(1, 0, steps + 1), shift).tolist()
    x = noise
    states = []
    for i in progress(range(steps), steps, shown, show=bool(shown)):
        if i in keep:
            states.append(x)
        x0 = cfg_x0(model, x, sig[i], words, guidance)
        x = x0 + sig[i + 1] * (x - x0) / sig[i]  # = x + (sig' - sig) v with v = (x - x0) / sig
    return x, states


def ode_regression_loss(model, states, target, words, sigmas, gen):
    """ODE init: states (B, K, T, ...) is a teacher trajectory at the K few-step sigmas, target its
    end. Each chunk picks its own state (noisy or mixed contexts, as in diffusion forcing); one
    forward under the block-causal mask."""
    B, K, T = states.shape[:3]
    c = model.chunk
    dev = states.device
    idx = torch.randint(K, (B, T // c), generator=gen, device=dev).repeat_interleave(c, 1)
    x = states[torch.arange(B, device=dev)[:, None], idx, torch.arange(T, device=dev)]
    mask = frame_mask(T, c, model.window, dev)
    x0 = predict_x0(model, x, sigmas.to(dev)[idx], words, mask=mask)[0]
    return F.mse_loss(x0, target)


@torch.no_grad()
def make_ode_pairs(teacher, words, args, rt, seed):
    """Teacher CFG ODE trajectories at the few-step sigmas (steps 0, n/4, n/2, 3n/4 of n):
    states (N, K, T, ...), ends."""
    gen = torch.Generator(rt.device).manual_seed(seed)
    shape = (len(words), args.frames, 3, args.resolution, args.resolution)
    noise = torch.randn(shape, generator=gen, device=rt.device)
    keep = range(0, ODE_EULER, ODE_EULER // args.denoise_steps)
    shown = f"ODE pairs (Euler steps of {len(words)} teacher videos)" if rt.master else ""
    with rt.amp:
        x0, s = sample_teacher(
            teacher, noise, words.to(rt.device), ODE_EULER, args.shift, args.guidance, keep, shown
        )
    return torch.stack(s, 1).half().cpu(), x0.half().cpu()


# ---------------------------------------------------------------- method: update steps
@dataclass
class Stage:
    """What one training stage updates, and its random streams."""

    name: str
    model: nn.Module  # the eager model being trained (checkpoints save this one)
    net: nn.Module  # model, compiled with --compile: the forward passes go through it
    ema: nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    gen: torch.Generator  # batches
    ngen: torch.Generator  # noise, sigmas, exit steps
    sigmas: torch.Tensor  # the few-step schedule
    total: int  # steps of the stage
    batch: int  # videos per step and process
    base_lr: float
    teacher: nn.Module | None = None  # frozen: ODE pairs, the real score
    critic: nn.Module | None = None  # DMD stages: the fake score
    opt_critic: torch.optim.Optimizer | None = None
    pairs: tuple | None = None  # ode: teacher trajectories, their ends, word ids
    step: int = 0

    def params(self):
        """The trained weights: the generator's and, in the DMD stages, the critic's."""
        return [*self.model.parameters(), *(self.critic.parameters() if self.critic else [])]


def grad_step(opt, scaler, loss, module, rt):
    """Backward, gradients averaged over ranks, unscaled (fp16), clipped at GRAD_CLIP, one step."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if rt.ddp:  # DDP by hand: the rollout calls the model many times per backward
        for p in module.parameters():
            dist.all_reduce(p.grad.div_(rt.world))
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(module.parameters(), GRAD_CLIP)
    scaler.step(opt)
    scaler.update()


@torch.no_grad()
def ema_update(ema, model, decay):
    # as torch.optim.swa_utils does
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def teacher_step(st, x, words, args, rt):
    """The teacher's flow-matching step on real videos, 10% null prompts for CFG. -> [loss]"""
    B = x.shape[0]
    with rt.amp:
        null = torch.rand(B, 1, generator=st.gen).to(rt.device) < 0.1
        sigma = sample_sigma(B, args.shift, st.ngen, rt.device)
        noise = torch.randn(x.shape, generator=st.ngen, device=rt.device)
        loss = flow_matching_loss(st.net, x, torch.where(null, 0, words), sigma, noise)
    grad_step(st.opt, st.scaler, loss, st.model, rt)
    return [loss.item()]


def ode_step(st, rt):
    """ODE initialisation: a batch of the teacher's trajectories regressed, each chunk from its own
    state (ode_regression_loss). -> [loss]"""
    states, ends, words = st.pairs
    with rt.amp:
        i = torch.randint(len(states), (st.batch,), generator=st.gen)
        loss = ode_regression_loss(
            st.net,
            states[i].to(rt.device).float(),
            ends[i].to(rt.device).float(),
            words[i].to(rt.device),
            st.sigmas,
            st.ngen,
        )
    grad_step(st.opt, st.scaler, loss, st.model, rt)
    return [loss.item()]


def student_sample(st, x, words, rt):
    """The generator's videos: its rollout from noise (the batch gives only prompts) or, tf/df, from
    real chunks. -> videos, word ids, exit step (-1: tf/df)."""
    self_forcing = st.name == "self_forcing"
    s = sample_exit_step(st.ngen, len(st.sigmas), rt.device, rt.ddp) if self_forcing else -1
    real = None if self_forcing else (x, st.name == "tf")
    with rt.amp:
        noise = torch.randn(x.shape, generator=st.ngen, device=rt.device)
        return rollout(st.net, noise, words, st.sigmas, st.ngen, exit_step=s, real=real), words, s


def critic_step(st, x, words, args, rt):
    """The critic (fake score) learns the generator's current outputs by flow matching; no gradient
    reaches the generator. -> loss"""
    with torch.no_grad():
        fake, words, _ = student_sample(st, x, words, rt)
    with rt.amp:
        sigma = sample_sigma(st.batch, args.shift, st.ngen, rt.device, 0.02, 0.98)
        noise = torch.randn(fake.shape, generator=st.ngen, device=rt.device)
        loss = flow_matching_loss(st.critic, fake, words, sigma, noise)
    grad_step(st.opt_critic, st.scaler, loss, st.critic, rt)
    return loss


def generator_step(st, x, words, args, rt):
    """The DMD generator step on a rollout with gradient (dmd_loss: frozen teacher with CFG against
    the critic). -> loss, g, exit step."""
    video, words, s = student_sample(st, x, words, rt)
    with rt.amp:
        sigma = sample_sigma(st.batch, args.shift, st.ngen, rt.device, 0.02, 0.98)
        noise = torch.randn(video.shape, generator=st.ngen, device=rt.device)
        loss, g = dmd_loss(video, st.teacher, st.critic, words, sigma, noise, args.guidance)
    grad_step(st.opt, st.scaler, loss, st.model, rt)
    return loss, g, s


def train_step(st, data, args, rt):
    """One training step of the stage -> its loss terms (loss_names)."""
    if st.name == "teacher":
        return teacher_step(st, *draw_batch(data, st.batch, st.gen, rt.device), args, rt)
    if st.name == "ode":
        return ode_step(st, rt)
    for _ in range(args.critic_updates):  # the critic follows the generator's current outputs
        batch = draw_batch(data, st.batch, st.gen, rt.device)
        critic_loss = critic_step(st, *batch, args, rt)
    batch = draw_batch(data, st.batch, st.gen, rt.device)
    loss, g, s = generator_step(st, *batch, args, rt)
    return [loss.item(), critic_loss.item(), g.abs().mean().item(), s]


def loss_names(stage):
    return ["dmd", "critic", "g_abs", "exit_step"] if stage in DMD_STAGES else ["loss"]


# ----------------------------------------------------------------------------- data
def load_clips(args, n_clips, split, rank=0, world=1, holdout=(), only=(), length=1):
    """Prompted clips, generated once: uint8 (N, T, C, H, W), word ids, prompts; rank r keeps r,
    r+world, ...; no holdout prompt. only: n_clips of these prompts in turn, each with its own
    random layout (the evaluation's held-out prompts), `length` times the training length. Steady
    clips (toy_data.render_attrs): the rules per frame of a --frames clip go on past it."""
    if only:
        items = []
        wanted = (only * n_clips)[:n_clips]
        for i, p in progress(enumerate(wanted), n_clips, f"{split} clips", show=rank == 0):
            rng = np.random.default_rng([args.seed, 10 + toy_data.SPLITS.index(split), i])
            attrs = toy_data.parse_prompt(p)
            res = args.resolution
            video = toy_data.render_attrs(rng, attrs, res, res, length * args.frames, args.frames)
            items.append({"prompt": p, "video": video})
    else:
        n = n_clips + (n_clips // 8 + 16 if holdout else 0)
        try:
            ds = toy_data.ToyDataset(
                n, args.resolution, args.resolution, args.frames, args.seed, split, args.frames
            )
        except (ValueError, FileNotFoundError, OSError) as e:
            raise SystemExit(f"error: {e}")
        keep = [
            i
            for i in range(len(ds))
            if toy_data.make_prompt(toy_data.sample_attrs(ds.rng(i))) not in holdout
        ][:n_clips]
        mine = keep[rank::world]
        shown = progress(mine, len(mine), f"{split} clips", show=rank == 0)
        items = [ds[i] for i in shown]  # toy_data renders with one thread
    if not items:
        raise SystemExit(
            f"error: --data {args.data} gave no {split} clips; raise --train-clips/--eval-clips"
        )
    videos = torch.stack([it["video"] for it in items]).clamp(0, 1)
    prompts = [it["prompt"] for it in items]
    words = torch.tensor([encode_prompt(p) for p in prompts])
    return (videos * 255).round().to(torch.uint8), words, prompts


def draw_batch(data, n, gen, device):
    """n random clips of the pool (videos uint8, word ids) -> videos in [-1, 1], word ids."""
    videos, words = data
    i = torch.randint(len(videos), (n,), generator=gen)
    return videos[i].to(device).float() / 127.5 - 1, words[i].to(device)


# ----------------------------------------------------------------------------- evaluation
PERF_KEYS = ("gen_", "first_", "kv_")  # evaluate()'s speed figures: perf/, not eval/
SHOWN = (  # the eval line's figures
    "prompt_alignment prompt_alignment_2x fd_probe fd_probe_2x fd_window fd_window_2x rotation "
    "rotation_share gen_frames_per_s first_chunk_latency_s kv_speedup_1x kv_speedup_4x "
    "kv_speedup_window_1x kv_speedup_window_4x"
).split()
FD_WINDOW = 2  # chunks per fd_window window (6 frames), one window every chunk
TURNING = 0.25 * toy_data.STEADY_TURN  # rad/frame: faster the prompted way counts as turning it


def rotation_rates(videos, prompts):
    """rotation_rate of the videos of rotating prompts, rad/frame the prompted way."""
    return [
        metrics.rotation_rate(v, 4 if at["shape"] == "square" else 3).item()
        * (1 if at["motion"] == "clockwise" else -1)
        for v, at in zip(videos, map(toy_data.parse_prompt, prompts))
        if at["type"] == "rotating"
    ]


def score(videos, ev, tag=""):
    """Against the real steady clips of the same prompts and length (ev["test"]):
    prompt_alignment and fd_probe of the last training-length window; fd_window: fd_probe of every
    FD_WINDOW chunks, one window a chunk, their mean and each (the long-video quality score);
    rotation: mean rad/frame the prompted way, rotation_share: the fraction turning that way faster
    than TURNING (a still shape or disc reads ~0)."""
    names = ("prompt_alignment", "fd_probe")
    test = ev["test"][:, : videos.shape[1]]
    frames = ev["frames"]
    row = metrics.evaluate_videos(videos[:, -frames:], ev["prompts"], names, test[:, -frames:])
    chunk = frames // ev["chunks"]
    try:
        w = metrics.fd_probe_windows(test, videos, FD_WINDOW * chunk, chunk)
        row.update(fd_window=float(np.mean(w)), fd_window_per_window=w)
    except metrics.MetricUnavailable as e:
        row.update(fd_window=None, fd_window_unavailable=str(e))
    rates = rotation_rates(videos, ev["prompts"])
    row["rotation"] = float(np.mean(rates)) if rates else None
    turning = [r > TURNING for r in rates]
    row["rotation_share"] = float(np.mean(turning)) if rates else None
    return {k + tag: v for k, v in row.items()}


def controls(ev):
    """The long-video score's check: the real clips against black, frozen (the first frame
    repeated), time-shuffled and noise videos, at 1x and 2x; real clips must score best."""
    real = ev["videos"]
    bad = {"real": real, **metrics.control_videos(real, torch.Generator().manual_seed(0))}
    out = {}
    for name, v in bad.items():
        row = {**score(v[:, : ev["frames"]], ev), **score(v, ev, "_2x")}
        out[name] = {k: row.get(k) for k in ("fd_window", "fd_window_2x", "fd_probe")}
    return out


@torch.no_grad()
def generate_videos(model, teacher, words, frames, args, rt, gen, **kw):
    """Videos in [0, 1] for word ids: students stream through `rollout` (kw: cache, on_step), the
    teacher solves its ODE."""
    shape = (len(words), frames, 3, args.resolution, args.resolution)
    noise = torch.randn(shape, generator=gen, device=rt.device)
    words = words.to(rt.device)
    with rt.amp:
        if teacher:
            x = sample_teacher(model, noise, words, ODE_EULER, args.shift, args.guidance)[0]
        else:
            x = rollout(
                model, noise, words, few_step_sigmas(args.denoise_steps, args.shift), gen, **kw
            )
    return ((x.float() + 1) / 2).clamp(0, 1).cpu()


def measure_speed(model, teacher, words, frames, args, rt, cache=True):
    """One video at a time, best of 5 calls (as timeit advises: other work on the machine only slows
    a call down): frames/s and the first chunk's latency (a one-chunk video; teacher: the whole
    video), with the KV cache, recomputing the prefix at every step (cache=False) or the window
    once per chunk (cache="window")."""
    kw = {} if teacher else {"cache": cache}
    t = []
    for n in (frames,) if teacher else (frames, args.chunk):
        gen = torch.Generator(rt.device).manual_seed(0)
        fps = metrics.measure_fps(
            generate_videos, model, teacher, words, n, args, rt, gen, num_frames=n, repeats=5, **kw
        )
        t.append(fps["s_per_call_min"])
    return frames / t[0], t[-1]  # the teacher's first frames come with its whole video


DIRECTION_SIGMAS = (0.95, 0.98, 1.0)  # where the direction word can decide x0 at all


def flip_direction(prompt):
    """'... rotating clockwise' <-> '... rotating counter-clockwise'."""
    turn = prompt.split()[-1]
    other = [r for r in toy_data.ROTATIONS if r != turn][0]
    return prompt[: -len(turn)] + other


@torch.no_grad()
def direction_probe(model, args, rt, n=32):
    """Does the (bidirectional) model use the direction word? n real steady clips of rotating
    prompts seen in training, noised to each of DIRECTION_SIGMAS: the MSE of its x0 to the clip
    with the prompt and with the direction flipped (equal: the word is ignored).
    -> {sigma: [mse prompted, mse flipped]}"""
    seen = [
        toy_data.make_prompt({"type": "rotating", "shape": shape, "color": color, "motion": turn})
        for color in toy_data.COLORS
        for shape in ("square", "triangle")
        for turn in toy_data.ROTATIONS
    ]
    seen = tuple(p for p in seen if p not in HOLDOUT)
    videos, words, prompts = load_clips(args, n, "val", only=seen)
    x = videos.to(rt.device).float() / 127.5 - 1
    flipped = torch.tensor([encode_prompt(flip_direction(p)) for p in prompts], device=rt.device)
    gen = torch.Generator(rt.device).manual_seed(args.seed + 7)
    noise = torch.randn(x.shape, generator=gen, device=rt.device)
    out = {}
    for sigma in DIRECTION_SIGMAS:
        xt = (1 - sigma) * x + sigma * noise
        with rt.amp:
            mse = [
                F.mse_loss(predict_x0(model, xt, sigma, w)[0], x).item() for w in (words, flipped)
            ]
        out[str(sigma)] = mse
    return out


@torch.no_grad()
def evaluate(model, stage, ev, args, rt, speed=True):
    """Score generations for the eval prompts at 1x and 2x the training length (students: rolling
    cache; teacher: all frames at once); speed: frames/s and first-chunk latency with the KV cache
    and its two baselines (nocache: the prefix at every step; window: the window once per chunk),
    at 1x and 4x, one after the other in this call (ratios)."""
    gen = torch.Generator(rt.device).manual_seed(args.seed + 5)
    teacher = stage == "teacher"
    v1 = generate_videos(model.eval(), teacher, ev["words"], args.frames, args, rt, gen)
    row = score(v1, ev)
    v2 = generate_videos(model, teacher, ev["words"], 2 * args.frames, args, rt, gen)
    row.update(score(v2, ev, "_2x"))
    if teacher:
        row["direction_word_mse"] = direction_probe(model, args, rt)
    for frames, tag in ((args.frames, ""), (4 * args.frames, "_4x")) if speed else ():
        ways = ((True, tag), (False, tag + "_nocache"), ("window", tag + "_window"))
        for cache, key in ways[: 1 if teacher else 3]:
            fps, first = measure_speed(model, teacher, ev["words"][:1], frames, args, rt, cache)
            row[f"gen_frames_per_s{key}"] = fps
            row[f"first_chunk_latency_s{key}"] = first
        fps = row[f"gen_frames_per_s{tag}"]
        for base, name in (("_nocache", "kv_speedup"), ("_window", "kv_speedup_window")):
            if not teacher:  # the cache against each baseline, measured just now
                row[f"{name}{tag or '_1x'}"] = fps / row[f"gen_frames_per_s{tag}{base}"]
    return row, v1


def save_pictures(model, videos, prompts, stage, args, rt, step, writer):
    """Samples, the attention masks by frame (white: visible) and, for a student, each chunk's x0
    after each step."""
    samples = os.path.join(args.out_dir, "samples")
    viz.save_video_grid(videos[:16], f"{samples}/{stage}_{step:06d}.gif", prompts[:16], fps=4)
    viz.save_video_grid(videos[:7], f"{samples}/{stage}_latest.png", prompts[:7])
    viz.log_video(writer, f"samples/{stage}", videos[:16], step, fps=4)
    k = 256 // args.frames
    student = frame_mask(args.frames, args.chunk, args.window).float()
    masks = torch.kron(
        torch.stack([torch.ones(args.frames, args.frames), student]), torch.ones(k, k)
    )
    captions = [
        "teacher, critic: every frame sees every frame (rows: query frame, columns: key frame)",
        f"student: chunks of {args.chunk}, window {args.window or 'all'}",
    ]
    path = os.path.join(args.out_dir, "plots", "attention_masks.png")
    viz.save_video_grid(masks[:, None, None].expand(-1, -1, 3, -1, -1), path, captions)
    if model is None or stage == "teacher":
        return
    rows = [[] for _ in range(args.denoise_steps)]
    gen = torch.Generator(rt.device).manual_seed(args.seed)
    words = torch.tensor([encode_prompt(HOLDOUT[0])])

    def record(b, j, x0):
        rows[j].append(x0[0].float().cpu())

    generate_videos(model, False, words, args.frames, args, rt, gen, on_step=record)
    steps = ((torch.stack([torch.cat(r) for r in rows]) + 1) / 2).clamp(0, 1)
    captions = [
        f"{HOLDOUT[0]}: every chunk's x0 after step {j + 1} of {args.denoise_steps}"
        for j in range(args.denoise_steps)
    ]
    viz.save_video_grid(steps, f"{samples}/denoising_{stage}.png", captions)


def read_metrics(args):
    """out_dir/metrics.json as this script wrote it ({} if there is none or another script's)."""
    path = os.path.join(args.out_dir, "metrics.json")
    old = {}
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
    return old if old.get("script") == SCRIPT else {}


def metric_rows(metrics):
    """metrics.json's rows by stage (and "real"); a stage's row has the step it was evaluated at."""
    return {**metrics.get("baselines", {}), "self_forcing": metrics.get("eval")}


def write_metrics(stage, row, perf, step, args, real, checks=None):
    """Merge a stage's row, with the step it was evaluated at, into out_dir/metrics.json ("eval":
    self_forcing; "baselines": the other stages and the real videos); the other stages' rows stay
    as they were. -> every row so far, by stage."""
    path = os.path.join(args.out_dir, "metrics.json")
    old = read_metrics(args)  # another script's metrics.json is replaced
    rows = {**metric_rows(old), stage: {"step": step, **row}, "real": real}
    perfs = old.get("perf", {}).get("stages", {})
    if perf:
        perfs = {**perfs, stage: perf}
    sf = rows["self_forcing"] or {}
    baselines = {k: rows[k] for k in (*STAGES, "real") if rows.get(k) and k != "self_forcing"}
    speed = {k: v for k, v in sf.items() if k.startswith(PERF_KEYS)}
    out = {
        "script": SCRIPT,
        "step": perfs.get("self_forcing", {}).get("steps", step),
        "wall_s": round(sum(p["wall_s"] + p["eval_s"] for p in perfs.values()), 1),
        "eval": sf,
        "baselines": baselines,
        "fd_window_controls": checks or old.get("fd_window_controls"),
        "perf": {**perfs.get("self_forcing", {}), **speed, "stages": perfs},
        "data": {
            "kind": args.data,
            "resolution": args.resolution,
            "frames": args.frames,
            "n_eval": args.eval_clips,
            "split": "test",  # the real clips every score compares with; prompts held out
            "steady": args.frames,  # toy_data.render_attrs: rules per frame past the length
        },
    }
    write_json(path, out)
    return rows


def finish_stage(model, stage, step, perf, args, rt, ev, writer):
    """Rank 0: evaluate a stage's model, log and draw it, and merge its row into metrics.json.
    perf: the stage's training figures (None: a mid-stage or --eval-only evaluation)."""
    t0 = time.time()
    row, videos = evaluate(model, stage, ev, args, rt)
    if writer:
        floats = {k: v for k, v in row.items() if isinstance(v, float)}
        speed = {k: v for k, v in floats.items() if k.startswith(PERF_KEYS)}
        scores = {k: v for k, v in floats.items() if k not in speed}
        log_scalars(writer, f"eval/{stage}", scores, step)
        log_scalars(writer, f"perf/{stage}", speed, step)
    save_pictures(model, videos, ev["prompts"], stage, args, rt, step, writer)
    if perf:
        perf = {**perf, "eval_s": round(time.time() - t0, 1)}
    rows = write_metrics(stage, row, perf, step, args, ev["real"], ev["controls"])
    key = "fd_window_per_window_2x"
    curves = {k: r[key] for k, r in rows.items() if r and r.get(key)}
    if curves:  # window k (from 1) ends at frame (FD_WINDOW + k - 1) * chunk
        viz.plot_metric_vs_horizon(
            curves,
            os.path.join(args.out_dir, "plots", "fd_window.png"),
            metric=f"fd_probe of {FD_WINDOW * args.chunk} frames",
            train_horizon=args.frames // args.chunk - FD_WINDOW + 1,
            title=f"fd_probe of each window of {FD_WINDOW} chunks at 2x, one a chunk",
        )
    shown = "  ".join(f"{k} {row[k]:.4g}" for k in SHOWN if row.get(k) is not None)
    print(f"eval {stage} step {step}: {shown}", flush=True)


def eval_set(args):
    """Rank 0's evaluation clips of the held-out prompts at 2x the training length, real clips of
    the same prompts in other layouts (test: the reference of every score), the real videos' row
    and the controls of the long-video score."""
    videos, words, prompts = load_clips(args, args.eval_clips, "val", only=HOLDOUT, length=2)
    ev = {"videos": videos.float() / 255, "words": words, "prompts": prompts}
    ev["frames"] = args.frames
    ev["chunks"] = args.frames // args.chunk
    test = load_clips(args, args.eval_clips, "test", only=HOLDOUT, length=2)[0]
    ev["test"] = test.float() / 255
    ev["real"] = {**score(ev["videos"][:, : args.frames], ev), **score(ev["videos"], ev, "_2x")}
    ev["controls"] = controls(ev)
    return ev


# ----------------------------------------------------------------------------- training loop
def model_arch(args):
    return dict(
        channels=3,
        resolution=args.resolution,
        patch=PATCH,
        width=args.width,
        depth=args.depth,
        chunk=args.chunk,
        window=args.window,
        vocab=len(VOCAB),
        words=MAX_WORDS,
    )


def stage_steps(stage, args):
    return {"teacher": args.teacher_steps, "ode": args.ode_steps}.get(stage, args.steps)


def stage_path(args, stage):
    return os.path.join(args.out_dir, f"ckpt_{stage}.pt")


def load_model(path, args, rt):
    """A stage checkpoint's EMA weights in a new DiT -> model, checkpoint."""
    ckpt = load_checkpoint(path, model_arch(args))
    model = DiT(**model_arch(args)).to(rt.device)
    load_weights(model, ckpt["ema"], path)
    return model, ckpt


def build_stage(name, args, rt, pool_words):
    """The stage's models, optimisers and random streams, in the order that fixes their seeds: the
    student starts from the teacher (ode) or the ODE student (DMD stages); the critic from the
    teacher, like Wan's fake score."""
    si = STAGES.index(name)
    dmd = name in DMD_STAGES
    torch.manual_seed(args.seed + si)
    model = DiT(**model_arch(args)).to(rt.device)
    teacher = None
    if name != "teacher":
        start = load_model(stage_path(args, STAGES[min(si, 2) - 1]), args, rt)[0]
        model.load_state_dict(start.state_dict())
        teacher = load_model(stage_path(args, "teacher"), args, rt)[0].requires_grad_(False)
    critic = copy.deepcopy(teacher).requires_grad_(True) if dmd else None
    ema = copy.deepcopy(model).requires_grad_(False)
    if dmd:
        betas, base_lr = (0.0, 0.999), args.gen_lr
    else:
        betas, base_lr = (0.9, 0.99), args.lr if name == "teacher" else args.lr / 3
    fused = rt.device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=base_lr, betas=betas, fused=fused)
    opt_critic = None
    if dmd:
        opt_critic = torch.optim.AdamW(
            critic.parameters(), lr=args.gen_lr, betas=betas, fused=fused
        )
    seed = args.seed + 1000 * rt.rank + 10 * si
    return Stage(
        name=name,
        model=model,
        net=model,
        ema=ema,
        opt=opt,
        scaler=make_scaler(rt),
        gen=torch.Generator().manual_seed(seed),
        ngen=torch.Generator(rt.device).manual_seed(seed + 1),
        sigmas=few_step_sigmas(args.denoise_steps, args.shift),
        total=stage_steps(name, args),
        batch=args.batch_size // 2 if dmd else args.batch_size,
        base_lr=base_lr,
        teacher=teacher,
        critic=critic,
        opt_critic=opt_critic,
    )


def resume_stage(st, ckpt, path, rt):
    """Continue from a stage checkpoint: weights, optimisers, scaler, step and random streams."""
    load_weights(st.model, ckpt["model"], path)
    load_weights(st.ema, ckpt["ema"], path)
    st.opt.load_state_dict(ckpt["optimizer"])
    st.scaler.load_state_dict(ckpt["scaler"])
    if st.critic is not None:
        load_weights(st.critic, ckpt["critic"], path)
        st.opt_critic.load_state_dict(ckpt["opt_critic"])
    st.step = ckpt["step"]
    data_state = set_rng_state(ckpt["rng"], rt.rank)
    if data_state is not None:
        st.gen.set_state(data_state[0])
        st.ngen.set_state(data_state[1])


def save_stage(st, args, rt):
    """The stage's checkpoint: every rank calls this (the generator states are gathered)."""
    state = {"stage": st.name, "model": st.model, "ema": st.ema, "optimizer": st.opt}
    state["scaler"] = st.scaler
    if st.critic is not None:
        state.update(critic=st.critic, opt_critic=st.opt_critic)
    data = [st.gen.get_state(), st.ngen.get_state()]
    save_checkpoint(stage_path(args, st.name), st.step, args, model_arch(args), data, rt, **state)


def write_samples(st, args, rt, ev, writer):
    """Rank 0: sample GIFs of the stage's EMA model for the first 16 evaluation prompts."""
    gen = torch.Generator(rt.device).manual_seed(args.seed + 5)
    words = ev["words"][:16]
    videos = generate_videos(st.ema, st.name == "teacher", words, args.frames, args, rt, gen)
    save_pictures(None, videos, ev["prompts"][:16], st.name, args, rt, st.step, writer)


def train_loop(st, data, args, rt, ev, writer):
    """Train the stage to its step count: update, EMA, log, evaluate, sample, checkpoint. Ctrl-C or
    SIGTERM: the step is finished, the stage's checkpoint saved and the run stopped. -> the
    SpeedMeter."""
    dmd = st.name in DMD_STAGES
    meter = LossMeter(loss_names(st.name), rt.device)
    speed = SpeedMeter(st.step, peak_flops(rt))
    flops = None  # one training step, counted once (a warm-up step, so it stays out of the timing)
    path = stage_path(args, st.name)
    with Control(rt) as control:
        while st.step < st.total:
            lr = lr_at(st.step, st.total, st.base_lr, 10 if dmd else 100, decay=not dmd)
            set_lr([st.opt], lr)  # the critic keeps --gen-lr
            if flops is None and st.step == speed.start + WARMUP_STEPS - 1:
                terms = []
                flops = count_flops(lambda: terms.extend(train_step(st, data, args, rt)))
            else:
                terms = train_step(st, data, args, rt)
            # the paper's EMA starts at step 200 of 600
            ema_update(st.ema, st.model, EMA_DECAY if st.step >= st.total // 3 else 0.0)
            meter.add(terms)
            st.step += 1
            speed.tick(st.step, flops)
            stop, log_now = control.poll(st.step, speed.start)
            if log_now or st.step % args.log_every == 0 or st.step == st.total:
                samples = st.batch * rt.world
                log_progress(
                    meter, speed, writer, st.params(), rt, st.step, st.total, lr, samples, st.name
                )
            more = st.step < st.total and not stop  # the final evaluation follows the loop
            if rt.master and more and st.step % args.eval_every == 0:
                finish_stage(st.ema, st.name, st.step, None, args, rt, ev, writer)
            if rt.master and more and st.step % args.sample_every == 0:
                write_samples(st, args, rt, ev, writer)
            if stop or st.step % args.ckpt_every == 0 or st.step == st.total:
                # never save weights gone non-finite since the last log
                meter.means(rt, st.params(), f"in stage {st.name} before step {st.step}")
                save_stage(st, args, rt)
            if stop:
                raise SystemExit(
                    f"interrupted after step {st.step} of stage {st.name}; saved {path}: run the "
                    "same command to resume"
                )
            speed.lap()
    return speed


def evaluated(args, stage, step):
    """Whether metrics.json has the stage's row at this step (a row without a step, written before
    rows had one, counts)."""
    row = metric_rows(read_metrics(args)).get(stage)
    return bool(row) and row.get("step", step) == step


def train_stage(name, args, rt, data, ev, writer):
    """One stage: resume or start it, train it, evaluate its EMA model. A finished stage is skipped
    (--no-resume retrains it), but evaluated if it was stopped after its last step, before its
    evaluation. data: the training pool (videos, word ids). -> whether this call wrote the stage's
    row of metrics.json."""
    path = stage_path(args, name)
    ckpt = load_checkpoint(path, model_arch(args)) if args.resume and os.path.isfile(path) else None
    if ckpt and ckpt["step"] >= stage_steps(name, args):
        fresh = rt.master and not evaluated(args, name, ckpt["step"])
        if fresh:
            model = load_model(path, args, rt)[0]
            finish_stage(model, name, ckpt["step"], None, args, rt, ev, writer)
        if rt.ddp:
            dist.barrier()
        return fresh
    t0 = time.time()
    st = build_stage(name, args, rt, data[1])
    if ckpt:
        resume_stage(st, ckpt, path, rt)
    if name == "ode":  # regenerated on resume: a fixed seed makes them the same pairs
        words = data[1][:ODE_PAIRS]
        st.pairs = (*make_ode_pairs(st.teacher, words, args, rt, args.seed + 100 + rt.rank), words)
    st.net = torch.compile(st.model) if rt.compile else st.model
    speed = train_loop(st, data, args, rt, ev, writer)
    if rt.master:
        perf = {
            "steps": st.step,
            "wall_s": round(time.time() - t0, 1),
            "params": sum(p.numel() for p in st.model.parameters()),
            **speed.summary(st.batch * rt.world),
            "device": device_name(rt),
            "dtype": rt.dtype,
        }
        finish_stage(st.ema, name, st.step, perf, args, rt, ev, writer)
    if rt.ddp:
        dist.barrier()  # the next stage starts from this stage's checkpoint
    return rt.master


HEADLINE = (("prompt_alignment", ".3f"), ("fd_probe", ".2f"), ("fd_window_2x", ".2f"))
ORDER = ("self_forcing", "tf", "df", "ode", "teacher", "real")  # the method, then its baselines


def kept_rows(args, fresh):
    """One line naming the rows of metrics.json this run did not write (earlier runs' or
    evaluations') and the step each was evaluated at; "" if there are none."""
    rows = metric_rows(read_metrics(args))
    kept = [
        f"{k} (evaluated at step {rows[k].get('step', 'unknown')})"
        for k in STAGES
        if rows.get(k) and k not in fresh
    ]
    if not kept:
        return ""
    return (
        f"metrics.json keeps rows of earlier runs: {', '.join(kept)}; --eval-only without --ckpt "
        "evaluates every stage checkpoint again"
    )


def summary(args, trained, minutes=0.0):
    """The last line of a run: the headline figures of every row of metrics.json, Self Forcing
    first and then its baselines, and where every output is."""
    rows = metric_rows(read_metrics(args))

    def figures(row):
        return " / ".join("-" if row.get(k) is None else format(row[k], f) for k, f in HEADLINE)

    shown = [k for k in ORDER if any((rows.get(k) or {}).get(h) is not None for h, _ in HEADLINE)]
    table = "; ".join(f"{k} {figures(rows[k])}" for k in shown) or "no figures"
    out = args.out_dir
    files = "metrics.json, samples/, plots/"
    if trained:
        files = f"ckpt_<stage>.pt, {files}, TensorBoard events (tensorboard --logdir {out})"
    done = f"done in {minutes:.1f} min; " if trained else ""
    return (
        f"{done}held-out prompts, prompt alignment and fd_probe at 1x / fd_window at 2x: {table}; "
        f"in {out}: {files}"
    )


# ----------------------------------------------------------------------------- entry points
def check_inputs(args):
    """Validate every flag before anything is written -> the checkpoints to evaluate or generate
    with, the --generate prompts' word ids."""
    counts = ["steps", "teacher_steps", "ode_steps", "train_clips", "eval_clips", "frames"]
    counts += ["width", "depth", "chunk", "batch_size", "denoise_steps", "critic_updates"]
    check_counts(args, counts + ["log_every", "eval_every", "sample_every", "ckpt_every"])
    try:  # a --data-dir implies its kind (never shapes): refused below, never ignored
        args.data = toy_data.data_kind(args.data, args.data_dir, Args.data)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    if args.data != "shapes":
        raise SystemExit(
            f"error: --data {args.data!r} has no prompts; "
            "this text-to-video script needs --data shapes"
        )
    if args.resolution % PATCH or args.resolution < PATCH:
        raise SystemExit(
            f"error: --resolution {args.resolution} is not a positive multiple of {PATCH} "
            "(the patch size); use e.g. 32"
        )
    if args.frames % args.chunk or ODE_EULER % args.denoise_steps or 0 < args.window < args.chunk:
        raise SystemExit(
            f"error: --frames {args.frames} must be a multiple of --chunk {args.chunk}, "
            f"--denoise-steps {args.denoise_steps} divide {ODE_EULER}, and --window {args.window} "
            "be 0 or at least --chunk"
        )
    gen_words = torch.tensor([encode_prompt(p) for p in args.generate], dtype=torch.long)
    if args.ckpt and not os.path.isfile(args.ckpt):
        raise SystemExit(
            f"error: --ckpt {args.ckpt} does not exist; "
            "pass the path of a train_self_forcing.py ckpt_<stage>.pt"
        )
    stages = STAGES if args.stage == "all" else (args.stage,)
    if args.ckpt:
        to_eval = [args.ckpt]
    elif args.generate:
        to_eval = [stage_path(args, "self_forcing")]
    else:
        to_eval = [stage_path(args, s) for s in stages if os.path.isfile(stage_path(args, s))]
    if (args.eval_only or args.generate) and not (to_eval and os.path.isfile(to_eval[0])):
        flag = "generate" if args.generate else "eval-only"
        missing = (to_eval or ["ckpt_<stage>.pt"])[0]
        raise SystemExit(
            f"error: --{flag} needs a checkpoint but there is no {missing} in {args.out_dir}; "
            "train first or pass --ckpt"
        )
    return to_eval, gen_words


RESUME_FREE_HERE = ("stage", "generate", "explain", "eval_clips")  # sampling and evaluation only
LATER_STAGES_ONLY = {  # flags a stage's training never reads: free to differ when it resumes
    "teacher": ("ode_steps", "steps", "gen_lr", "guidance", "denoise_steps", "critic_updates"),
    "ode": ("steps", "gen_lr", "critic_updates"),
}


def check_stages(stages, args):
    """Before any data is made: a single stage has the checkpoints it starts from, and every stage
    checkpoint that training will continue is this script's, of this architecture and was trained
    with the flags that shape its stage (check_resume)."""
    needs = STAGES[: min(STAGES.index(stages[0]), 2)]  # ode: the teacher; DMD: it and the ODE one
    for need in needs if args.stage != "all" else ():
        if not os.path.isfile(stage_path(args, need)):
            raise SystemExit(
                f"error: --stage {args.stage} needs {stage_path(args, need)}; "
                f"run --stage {need} first (or --stage all)"
            )
    for name in stages if args.resume else ():
        path = stage_path(args, name)
        ckpt = load_checkpoint(path, model_arch(args)) if os.path.isfile(path) else None
        if ckpt and ckpt["step"] < stage_steps(name, args):
            free = RESUME_FREE_HERE + LATER_STAGES_ONLY.get(name, ())
            check_resume(ckpt, args, path, free)


def generate(path, words, args, rt):
    """Streaming generation (rollout: chunk by chunk) into generated.gif and .png, then the speed of
    one video at a time."""
    model, ckpt = load_model(path, args, rt)
    teacher = ckpt["stage"] == "teacher"
    gen = torch.Generator(rt.device).manual_seed(0)
    videos = generate_videos(model.eval(), teacher, words, args.frames, args, rt, gen)
    fps, first = measure_speed(model, teacher, words[:1], args.frames, args, rt)
    out = os.path.join(args.out_dir, "generated.gif")
    viz.save_video_grid(videos, out, list(args.generate), fps=4)
    viz.save_video_grid(videos, out.replace(".gif", ".png"), list(args.generate))
    print(
        f"{ckpt['stage']} model of {path} (step {ckpt['step']}), {rt.device.type} {rt.dtype}, "
        f"{args.frames} frames per video: {fps:.0f} frames/s, first chunk after "
        f"{1000 * first:.1f} ms; wrote {out} and .png"
    )


EXPLAINED = (  # --explain: the model, then the method's functions in the order of this file
    DiT,
    frame_mask,
    few_step_sigmas,
    flow_matching_loss,
    dmd_loss,
    rollout,
    sample_teacher,
    ode_regression_loss,
    grad_step,
    teacher_step,
    ode_step,
    student_sample,
    critic_step,
    generator_step,
    evaluate,
    score,
)


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
    if args.explain:
        print("\n\n".join(f"{f.__name__}: {' '.join(f.__doc__.split())}" for f in EXPLAINED))
        return
    rt = setup(args)
    to_eval, gen_words = check_inputs(args)
    if args.generate:
        generate(to_eval[0], gen_words, args, rt)
        return
    stages = STAGES if args.stage == "all" else (args.stage,)
    if not args.eval_only:
        check_stages(stages, args)  # fail fast: before the data is made

    # evaluation (rank 0): held-out prompts; each stage's row is merged into metrics.json
    ev = eval_set(args) if rt.master else None
    if rt.master and ev["real"].get("prompt_alignment_unavailable"):  # now, not after training
        reason = ev["real"]["prompt_alignment_unavailable"]
        print(f"warning: {reason}; until then there is no prompt_alignment or fd_probe", flush=True)
    if args.eval_only:
        fresh = set()
        for path in to_eval if rt.master else ():
            model, ckpt = load_model(path, args, rt)
            finish_stage(model, ckpt["stage"], ckpt["step"], None, args, rt, ev, None)
            fresh.add(ckpt["stage"])
        if rt.master:
            print("\n".join(filter(None, [kept_rows(args, fresh), summary(args, trained=False)])))
        teardown(rt)
        return

    pool, pool_words, _ = load_clips(args, args.train_clips, "train", rt.rank, rt.world, HOLDOUT)
    writer = None
    if rt.master:
        writer = open_writer(args, 0)
        params = sum(p.numel() for p in DiT(**model_arch(args)).parameters()) / 1e6
        print(
            f"train_self_forcing: {params:.2f}M params per model, {rt.device.type} {rt.dtype}, "
            f"compile {rt.compile}, world {rt.world}, {len(pool)} training clips/rank of "
            f"{args.data}, stages {', '.join(stages)}; outputs in {args.out_dir}",
            flush=True,
        )
    t_run = time.time()
    fresh = {s for s in stages if train_stage(s, args, rt, (pool, pool_words), ev, writer)}
    if rt.master:
        writer.close()
        viz.plot_training_curves(
            args.out_dir, os.path.join(args.out_dir, "plots", "training_curves.png")
        )
        done = summary(args, trained=True, minutes=(time.time() - t_run) / 60)
        print("\n".join(filter(None, [kept_rows(args, fresh), done])))
    teardown(rt)


if __name__ == "__main__":
    run(main, tyro.cli(Args))
