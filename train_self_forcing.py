"""Self Forcing: a block-causal video diffusion model trained on its own KV-cached rollouts with DMD.

A small DiT writes prompted toy videos (32x32, 12 frames) in chunks of 3 frames, each denoised in 4 steps while it
attends to a KV cache of the clean earlier chunks. Self Forcing trains it on its *own* rollouts, made by the function
used at inference (`rollout`), scored whole by distribution matching distillation (DMD) against a bidirectional
teacher: training sees the context inference will see. Stages (--stage; default all, in order; each writes
ckpt_<stage>.pt and its metrics.json row): teacher (flow matching, 10% null prompts for CFG); ode (the causal student,
initialised from the teacher, regresses its CFG ODE trajectories at the few-step sigmas); self_forcing (DMD on rollouts,
one random exit step with gradient, detached cache, frozen teacher with CFG as real score, 5 critic updates per
generator update); tf, df (the TF+DMD and DF+DMD ablation: one step per chunk from a noised real chunk, real context).

Paper: Huang, Li, He, Zhou, Shechtman, "Self Forcing: Bridging the Train-Test Gap in Autoregressive Video Diffusion"
(2025); DMD: Yin et al. (2024); CausVid: Yin et al. (2025). Simplified: pixels, not VAE latents (tokens read and write
16x16 windows at stride 8: no seams); word embeddings mapped linearly, not umT5; a dense mask, not FlexAttention; no attention sinks;
x0 prediction, not velocity; TF/DF through the KV cache (same attention and gradients as a parallel mask). See --explain.

    python train_self_forcing.py                                     # CPU: every stage, 24-29 min on 2 cores
    python train_self_forcing.py --generate "A red circle moving from left to right" --frames 48
    python train_self_forcing.py --width 256 --depth 8 --batch-size 64 --teacher-steps 20000 --steps 1000  # GPU
    torchrun --standalone --nproc_per_node=2 train_self_forcing.py   # DDP (nccl on CUDA, gloo on CPU)

Outputs in --out-dir: ckpt_<stage>.pt, args.json, metrics.json ("eval": Self Forcing; "baselines": teacher, ode, tf,
df, real videos), samples/, plots/ (attention masks, drift), TensorBoard events (train/ eval/ perf/ samples/ <stage>/*).
"""

import copy
import json
import math
import os
import random
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
    """generator updates of the self_forcing stage, and of tf and df (the ablation gives each the same number)"""
    teacher_steps: int = 5000
    """flow-matching steps of the teacher"""
    ode_steps: int = 400
    """ODE-regression steps of the causal student"""
    seed: int = 0
    """random seed: model init, data sets, noise and batch order"""
    out_dir: str = "runs/train_self_forcing"
    """folder for ckpt_<stage>.pt, metrics.json, TensorBoard events, samples/ and plots/"""
    resume: bool = True
    """continue each stage from out_dir/ckpt_<stage>.pt when it exists (a finished stage is skipped)"""
    eval_only: bool = False
    """evaluate --ckpt, or every stage checkpoint in out_dir, write metrics.json, samples and plots, then exit"""
    ckpt: str | None = None
    """checkpoint to evaluate or generate with; None: every stage in out_dir (--generate: ckpt_self_forcing.pt)"""
    generate: tuple[str, ...] = ()
    """prompts to generate, streaming chunk by chunk, --frames long, into out_dir/generated.gif, then exit"""
    explain: bool = False
    """print how the pieces of the method fit together, then exit"""
    log_every: int = 50
    """print and log training losses every N steps"""
    eval_every: int = 2500
    """held-out evaluation every N steps of a stage (and always at its end)"""
    sample_every: int = 1000
    """write sample GIFs every N steps of a stage"""
    ckpt_every: int = 250
    """write the stage checkpoint every N steps (and at the end and on Ctrl-C)"""
    # system
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto: CUDA if present, else CPU"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """autocast dtype; auto: bf16 on CUDA and bf16-capable CPUs, fp16 + GradScaler on older GPUs, else fp32"""
    compile: tyro.conf.DisallowNone[bool | None] = None
    """torch.compile the model; None (unset): on for CUDA, off otherwise"""
    # data
    data: str = "shapes"
    """data kind: shapes (the prompted toy videos; the only kind with prompts)"""
    data_dir: str | None = None
    """unused by shapes; kept so every script takes the same flags"""
    resolution: int = 32
    """frame size in pixels (divisible by 8: a token per 8x8 patch, reading and writing the 16x16 window around it)"""
    frames: int = 12
    """frames per video (a multiple of --chunk): the training length"""
    train_clips: int = 4096
    """prompted clips generated once into memory as the training pool (split 'train', HOLDOUT prompts removed)"""
    eval_clips: int = 128
    """evaluation clips: the HOLDOUT prompts (never trained on) in turn, each with a random layout, generated for and compared to"""
    # model
    width: int = 128
    """transformer width (heads of 32 dims)"""
    depth: int = 4
    """transformer blocks"""
    chunk: int = 3
    """frames per autoregressive chunk (denoised together, bidirectional inside, causal across)"""
    window: int = 9
    """student's attention window in frames, its own chunk included (0: all); below --frames, so training rolls"""
    # optim
    batch_size: int = 16
    """videos per batch per process (teacher, ODE regression; the DMD stages roll out half as many)"""
    lr: float = 1e-3
    """teacher peak learning rate (AdamW; ODE regression: lr/3), after 100 warm-up steps, cosine-decayed to lr/10"""
    gen_lr: float = 1e-4
    """generator and critic learning rate of the DMD stages (constant after 10 warm-up steps; AdamW betas (0, 0.999))"""
    # method
    shift: float = 5.0
    """timestep shift k of the sigma grid: sigma = k s / (1 + (k - 1) s)"""
    denoise_steps: int = 4
    """few-step schedule: uniform timesteps [1000, 750, 500, 250] warped through the shifted grid"""
    guidance: float = 1.0
    """classifier-free guidance of the teacher in x0 space: x0 = c + guidance (c - u) (real score, ODE pairs); the paper's 3 gives this small teacher holes and colour fringes"""
    critic_updates: int = 5
    """critic updates per generator update (dfake_gen_update_ratio)"""


STAGES = ("teacher", "ode", "self_forcing", "tf", "df")
HOLDOUT = ("A red circle moving from left to right", "A blue square moving from top to bottom", "A yellow square rotating clockwise",
           "A green triangle moving from bottom right to top left", "Color gradient transitioning from cyan to orange",
           "An orange circle moving from right to left", "A white ball bouncing")  # never trained on
VOCAB = ["<null>"] + sorted({*"a an moving from to rotating color gradient transitioning ball bouncing".split(), *toy_data.COLORS,
                             *toy_data.SHAPES, *(w for d in toy_data.DIRECTIONS for w in d.split("_")), *toy_data.ROTATIONS})
MAX_WORDS = 10  # "An orange triangle moving from bottom right to top left"
PATCH, ODE_EULER, ODE_PAIRS, EMA_DECAY, GRAD_CLIP = 8, 16, 512, 0.99, 10.0  # teacher ODE: 16 Euler steps; EMA, clip: the paper's


def encode_prompt(prompt):
    """'A red circle ...' -> MAX_WORDS word ids (0 pads; all zeros is the null prompt). Unknown words stop the script."""
    words = prompt.strip().rstrip(".").lower().split()
    bad = [w for w in words if w not in VOCAB]
    if bad or len(words) > MAX_WORDS:
        raise SystemExit(f"error: prompt {prompt!r}: " + (f"unknown word(s) {', '.join(bad)}" if bad else f"more than {MAX_WORDS} words")
                         + f"; the vocabulary is: {' '.join(VOCAB[1:])}")
    return [VOCAB.index(w) for w in words] + [0] * (MAX_WORDS - len(words))


# ----------------------------------------------------------------------------- model
def frame_mask(frames, chunk, window=0, device=None, cached=0):
    """Block-causal attention by frame, True where visible: a query in chunk b sees the keys of frames [end - window, end), end =
    the end of chunk b (window 0: from frame 0); the keys start with `cached` earlier frames (a KV cache). -> (frames, cached + frames)"""
    end = cached + (torch.arange(frames, device=device) // chunk + 1) * chunk
    f = torch.arange(cached + frames, device=device)
    return (f[None] < end[:, None]) & (f[None] >= (end[:, None] - window if window else 0))


def attention(q, k, v, mask):
    """Softmax attention, mask True where a query may look; written out with gradient (CPU SDPA's backward is slow here: a training step ~1.3x faster), SDPA without."""
    if not torch.is_grad_enabled():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    a = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    return (a if mask is None else a.masked_fill(~mask, -math.inf)).softmax(-1) @ v


class Block(nn.Module):
    """adaLN-Zero block, per-frame modulation; attention over its frames plus cached keys/values of earlier frames. 3D RoPE
    (Wan's): half of each head's dims turn with the frame index, a quarter each with the patch row and column."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.n1, self.qkv, self.proj = heads, nn.LayerNorm(d, elementwise_affine=False), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.n2, self.mod = nn.LayerNorm(d, elementwise_affine=False), nn.Linear(d, 6 * d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
        nn.init.zeros_(self.mod.weight), nn.init.zeros_(self.mod.bias)  # every block starts as the identity

    def forward(self, x, c, cos, sin, mask, kv):
        B, T, N, D = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.mod(c).unsqueeze(2).chunk(6, -1)  # (B, T, 1, D): one set per frame
        q, k, v = self.qkv(self.n1(x) * (1 + sc1) + sh1).view(B, T * N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        r = cos.shape[-1]  # RoPE on dims [0, 2r): keys are rotated to their absolute place before they are cached
        q, k = (torch.cat([u[..., :r] * cos - u[..., r:2 * r] * sin, u[..., :r] * sin + u[..., r:2 * r] * cos, u[..., 2 * r:]], -1).to(v.dtype) for u in (q, k))
        new = (k, v)  # this call's keys/values, for the caller's cache
        k, v = (k, v) if kv is None else (torch.cat([kv[0], k], 2), torch.cat([kv[1], v], 2))
        h = attention(q, k, v, mask)
        x = x + g1 * self.proj(h.transpose(1, 2).reshape(B, T, N, D))
        return x + g2 * self.mlp(self.n2(x) * (1 + sc2) + sh2), new


class DiT(nn.Module):
    """One transformer for every role: teacher, critic (no mask: bidirectional), causal student in parallel (frame mask)
    or chunk by chunk (kv: the cache of earlier chunks). Noisy frames, a noise level per frame, word ids -> x0. Each frame is
    modulated by its noise level, the prompt and its absolute index (sin-cos; the RoPE of attention is only relative)."""

    def __init__(self, channels=3, resolution=32, patch=8, width=128, depth=4, chunk=3, window=9, vocab=len(VOCAB), words=MAX_WORDS):
        super().__init__()
        self.patch, self.chunk, self.window, self.tokens = patch, chunk, window, (resolution // patch) ** 2
        self.inp = nn.Linear(channels * 4 * patch * patch, width)  # overlapping patches: 2p x 2p windows at stride p
        rc = torch.stack([torch.arange(self.tokens) // (resolution // patch), torch.arange(self.tokens) % (resolution // patch)], 1)
        a = rc[:, :, None] * 100.0 ** -(torch.arange(width // 4) / (width // 4))  # fixed 2D sin-cos (DiT), as loud as a noisy patch
        self.register_buffer("space", torch.cat([a.sin(), a.cos()], -1).flatten(1), persistent=False)  # (learned 0.02 ones drown)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.frame = nn.Linear(width, width)  # absolute frame index: where a "left to right" object should be now
        self.word, self.word_pos = nn.Embedding(vocab, 32), nn.Parameter(0.02 * torch.randn(words, 32))
        self.text = nn.Linear(words * 32, width)  # linear in the words (by slot): an unseen prompt is a sum of seen parts
        self.blocks = nn.ModuleList(Block(width, width // 32) for _ in range(depth))
        self.norm, self.final_mod = nn.LayerNorm(width, elementwise_affine=False), nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, channels * 4 * patch * patch)  # 2p x 2p windows again, summed where they overlap
        for layer in (self.final_mod, self.out):
            nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(8) / 8), persistent=False)  # frame: 16 of 32 head dims
        self.register_buffer("space_ang", (rc[:, :, None] * 10.0 ** -(torch.arange(4) / 4)).flatten(1), persistent=False)  # row, column

    def forward(self, x, sigma, words, pos=0, mask=None, kv=None):
        """x (B, T, C, H, W), sigma (B, T), words (B, MAX_WORDS); pos: absolute index of the first frame; mask: (T, K)
        frame mask or None; kv: per block (K, V) of earlier frames or None. -> x0, per block (K, V) of x."""
        B, T, C, H, W = x.shape
        p, half = self.patch, self.time[0].in_features // 2
        h = self.inp(F.unfold(x.reshape(B * T, C, H, W), 2 * p, padding=p // 2, stride=p).transpose(1, 2)).view(B, T, self.tokens, -1) + self.space
        text = self.text((self.word(words) + self.word_pos).flatten(1))
        k, when = torch.arange(half, device=x.device) / half, (pos + torch.arange(T, device=x.device)).float()[:, None]  # absolute frames
        t, f = 1000 * sigma.float()[..., None] * torch.exp(-math.log(10000) * k), when * torch.exp(-math.log(1000) * k)
        c = F.silu(self.time(torch.cat([t.cos(), t.sin()], -1)) + text[:, None] + self.frame(torch.cat([f.cos(), f.sin()], -1)))  # (B, T, D)
        ang = torch.cat([(when * self.inv_freq).repeat_interleave(self.tokens, 0), self.space_ang.repeat(T, 1)], 1)  # (T * tokens, 16): when, row, column
        mask = None if mask is None else mask.repeat_interleave(self.tokens, 0).repeat_interleave(self.tokens, 1)  # frames -> tokens
        cos, sin, new = ang.cos(), ang.sin(), [None] * len(self.blocks)  # once, not per block
        for i, block in enumerate(self.blocks):
            h, new[i] = block(h, c, cos, sin, mask, kv[i] if kv else None)
        sh, sc = self.final_mod(c).unsqueeze(2).chunk(2, -1)
        out = self.out(self.norm(h) * (1 + sc) + sh).view(B * T, self.tokens, -1).transpose(1, 2).float()
        return F.fold(out, (H, W), 2 * p, padding=p // 2, stride=p).view(B, T, C, H, W), new  # no seams at patch edges


# ----------------------------------------------------------------------------- method: schedule and losses
def shift_sigma(s, shift):
    """The shifted sigma grid: more of the steps at high noise."""
    return shift * s / (1 + (shift - 1) * s)


def few_step_sigmas(steps=4, shift=5.0):
    """warp_denoising_step: timesteps [1000, 750, 500, 250] looked up in the shifted grid: [1000, 937.5, 833.3, 625]."""
    return shift_sigma(torch.linspace(1, 0, 1001)[1000 - torch.linspace(1000, 0, steps + 1)[:-1].round().long()], shift)


def sample_sigma(n, shift, gen, device, lo=0.0, hi=1.0):
    """sigma of a random grid entry (t ~ U{0..999} then shifted), clamped to [lo, hi]; (n,)."""
    return shift_sigma(torch.linspace(1, 0, 1001, device=device)[torch.randint(1000, (n,), generator=gen, device=device)], shift).clamp(lo, hi)


def predict_x0(model, x, sigma, words, pos=0, mask=None, kv=None):
    """The clean video in fp32; sigma: a number, (B,) or (B, T). -> x0, this call's keys/values. The network predicts x0, not
    the velocity v = (x_t - x0) / sigma: with 8x8x3-pixel tokens wider than the model, v (mostly noise) cannot pass."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    sigma = sigma.expand(x.shape[:2]) if sigma.ndim == 0 else sigma[:, None].expand(x.shape[:2]) if sigma.ndim == 1 else sigma
    x0, new = model(x, sigma, words, pos, mask, kv)
    return x0.float(), new


def cfg_x0(model, x, sigma, words, guidance):
    """Classifier-free guidance in x0 space, conditional and null prompt in one batch: c + g (c - u)."""
    sigma = sigma.repeat(2) if torch.is_tensor(sigma) else sigma
    c, u = predict_x0(model, torch.cat([x, x]), sigma, torch.cat([words, torch.zeros_like(words)]))[0].chunk(2)
    return c + guidance * (c - u)


def flow_matching_loss(model, x0, words, sigma, noise):
    """Teacher and critic: mean ||x0_hat(x_t) - x0||^2 at x_t = (1 - sigma) x0 + sigma noise, sigma (B,): flow matching's
    velocity loss weighted by sigma^2."""
    return F.mse_loss(predict_x0(model, x0 + sigma.view(-1, 1, 1, 1, 1) * (noise - x0), sigma, words)[0], x0)


def dmd_loss(x, teacher, critic, words, sigma, noise, guidance):
    """DMD on whole videos x: noise x to sigma (one per video); the frozen teacher with CFG (real score) and the critic (fake
    score) denoise it; g = (x0_fake - x0_real) / mean|x - x0_real|. -> 0.5 mse(x, sg(x - g)), gradient g/numel, and g."""
    with torch.no_grad():
        xt = x.detach() + sigma.view(-1, 1, 1, 1, 1) * (noise - x.detach())
        x0_real = cfg_x0(teacher, xt, sigma, words, guidance)
        x0_fake = predict_x0(critic, xt, sigma, words)[0]
        g = torch.nan_to_num((x0_fake - x0_real) / (x.detach() - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True))
    return 0.5 * F.mse_loss(x.double(), (x.double() - g.double()).detach()), g


def sample_exit_step(gen, n, device, ddp=False):
    """The one denoising step (0..n-1) at which every chunk of this rollout exits with gradient; rank 0's draw."""
    s = torch.randint(n, (1,), generator=gen, device=device)
    dist.broadcast(s, 0) if ddp else None
    return int(s)


# ----------------------------------------------------------------------------- method: sampling
def rollout(model, noise, words, sigmas, gen, exit_step=None, real=None, cache=True, on_step=None):
    """THE few-step AR sampler, for inference (exit_step None, under no_grad) and training. Per chunk: predict x0, re-noise it
    to the next sigma with fresh noise (gen), repeat; then run the clean x0 once at t = 0 and cache its keys and values,
    detached, keeping the last window - chunk frames. cache=False recomputes the prefix at every step: the same output at
    quadratic cost. Self Forcing: only step exit_step has gradient; its x0 is the chunk. real = (video, tf): TF/DF, one step
    from the real chunk noised to a random few-step sigma, the real chunk cached clean (TF) or noised (DF) with gradient. on_step(b, j, x0)"""
    c, B, T = model.chunk, noise.shape[0], noise.shape[1]
    keep = (model.window - c) * model.tokens if model.window else math.inf  # cached tokens: window - chunk frames
    kv, outs, grad, ahead = [], [], torch.is_grad_enabled(), None
    for b in range(T // c):
        x, frames = noise[:, b * c:(b + 1) * c], slice(b * c, (b + 1) * c)
        if real is not None:
            sig = sigmas.to(x.device)[torch.randint(len(sigmas), (B,), generator=gen, device=x.device)]
            x = (1 - sig.view(-1, 1, 1, 1, 1)) * real[0][:, frames] + sig.view(-1, 1, 1, 1, 1) * x
            x0 = predict_x0(model, x, sig, words, b * c, kv=kv)[0]
            context, context_sigma = (real[0][:, frames], 0.0) if real[1] else (x, sig)
        for j, sigma in enumerate(sigmas.tolist() if real is None else ()):  # the few-step sampler
            with torch.set_grad_enabled(grad and j == exit_step):  # the one forward with gradient
                if cache:  # ahead: this chunk's first step, made along with the last chunk's context pass
                    x0 = ahead if j == 0 and ahead is not None else predict_x0(model, x, sigma, words, b * c, kv=kv)[0]
                else:
                    sig = torch.cat([torch.zeros(B, b * c), torch.full((B, c), sigma)], 1).to(x.device)
                    x0 = predict_x0(model, torch.cat([o.detach() for o in outs] + [x], 1), sig, words,
                                    mask=frame_mask((b + 1) * c, c, model.window, x.device))[0][:, -c:]
            on_step(b, j, x0) if on_step else None
            if j == len(sigmas) - 1 or j == exit_step:
                context, context_sigma = x0.detach(), 0.0
                break
            nxt = float(sigmas[j + 1])
            x = (1 - nxt) * x0 + nxt * torch.randn(x0.shape, generator=gen, device=x0.device)
        outs.append(x0)
        if cache and b < T // c - 1:  # the context pass: later chunks see clean context, never noisy-step keys
            fuse = not grad and real is None  # inference: the next chunk's first step rides along (one call fewer, same x0)
            inp = torch.cat([context, noise[:, (b + 1) * c:(b + 2) * c]], 1) if fuse else context
            sig = torch.tensor([0.0] * c + [float(sigmas[0])] * c, device=x.device).expand(B, -1) if fuse else context_sigma
            mask = frame_mask(2 * c, c, model.window, x.device, kv[0][0].shape[2] // model.tokens if kv else 0) if fuse else None
            with torch.set_grad_enabled(grad and real is not None):
                out, new = predict_x0(model, inp, sig, words, b * c, mask, kv)
            ahead, new = out[:, c:] if fuse else None, [tuple(t[:, :, :c * model.tokens] for t in kn) for kn in new]  # keep the context's
            kv = [tuple(torch.cat([o, n], 2) for o, n in zip(old, kn)) for old, kn in zip(kv, new)] if kv else new
            kv = [tuple(t[:, :, max(0, t.shape[2] - keep):] for t in kn) for kn in kv]  # the rolling cache
    return torch.cat(outs, 1)


@torch.no_grad()
def sample_teacher(model, noise, words, steps, shift, guidance, keep=()):
    """Euler on the probability-flow ODE over the shifted grid with CFG, all frames at once. -> x0, states at steps in keep."""
    sig, x, states = shift_sigma(torch.linspace(1, 0, steps + 1), shift).tolist(), noise, []
    for i in range(steps):
        states += [x] if i in keep else []
        x0 = cfg_x0(model, x, sig[i], words, guidance)
        x = x0 + sig[i + 1] * (x - x0) / sig[i]  # = x + (sig' - sig) v with v = (x - x0) / sig
    return x, states


def ode_regression_loss(model, states, target, words, sigmas, gen):
    """ODE init: states (B, K, T, ...) is a teacher trajectory at the K few-step sigmas, target its end. Each chunk picks
    its own state (noisy or mixed contexts, as in diffusion forcing); one forward under the block-causal mask."""
    (B, K, T), c, dev = states.shape[:3], model.chunk, states.device
    idx = torch.randint(K, (B, T // c), generator=gen, device=dev).repeat_interleave(c, 1)
    x = states[torch.arange(B, device=dev)[:, None], idx, torch.arange(T, device=dev)]
    x0 = predict_x0(model, x, sigmas.to(dev)[idx], words, mask=frame_mask(T, c, model.window, dev))[0]
    return F.mse_loss(x0, target)


@torch.no_grad()
def make_ode_pairs(teacher, words, args, device, amp, seed):
    """Teacher CFG ODE trajectories at the few-step sigmas (steps 0, n/4, n/2, 3n/4 of n): states (N, K, T, ...), ends."""
    noise = torch.randn(len(words), args.frames, 3, args.resolution, args.resolution, generator=torch.Generator(device).manual_seed(seed), device=device)
    with amp:
        x0, s = sample_teacher(teacher, noise, words.to(device), ODE_EULER, args.shift, args.guidance, range(0, ODE_EULER, ODE_EULER // args.denoise_steps))
    return torch.stack(s, 1).half().cpu(), x0.half().cpu()


# ----------------------------------------------------------------------------- data
def load_clips(args, n_clips, split, rank=0, world=1, holdout=(), only=()):
    """Prompted clips, generated once: uint8 (N, T, C, H, W), word ids, prompts; rank r keeps r, r+world, ...; no holdout prompt.
    only: n_clips of these prompts in turn, each with its own random layout (the evaluation's held-out prompts)."""
    if only:
        items = [{"prompt": p, "video": toy_data.render_attrs(np.random.default_rng([args.seed, 10 + toy_data.SPLITS.index(split), i]),
                  toy_data.parse_prompt(p), args.resolution, args.resolution, args.frames)} for i, p in enumerate((only * n_clips)[:n_clips])]
    else:
        try:
            ds = toy_data.make_dataset(args.data, n_clips + (n_clips // 8 + 16 if holdout else 0), args.resolution,
                                       args.frames, args.seed, split, args.data_dir)
        except (ValueError, FileNotFoundError, OSError) as e:
            raise SystemExit(f"error: {e}")
        keep = [i for i in range(len(ds)) if toy_data.make_prompt(toy_data.sample_attrs(ds.rng(i))) not in holdout][:n_clips]
        items = [ds[i] for i in keep[rank::world]]  # toy_data renders with one thread: tiny ops only contend
    if not items:
        raise SystemExit(f"error: --data {args.data} gave no {split} clips; raise --train-clips/--eval-clips")
    videos, prompts = (torch.stack([it["video"] for it in items]).clamp(0, 1) * 255).round().to(torch.uint8), [it["prompt"] for it in items]
    return videos, torch.tensor([encode_prompt(p) for p in prompts]), prompts


# ----------------------------------------------------------------------------- evaluation
def score(videos, ev, tag=""):
    """prompt_alignment, fd_probe of the last training-length window; drift: per frame the MSE to the nearest real frame; rotation."""
    row = metrics.evaluate_videos(videos[:, -ev["test"].shape[1]:], ev["prompts"], ("prompt_alignment", "fd_probe"), ev["test"])
    a, b = videos.flatten(2).double(), ev["test"].flatten(0, 1).flatten(1).double()
    d = ((a * a).sum(-1, keepdim=True) + (b * b).sum(-1) - 2 * a @ b.T).amin(-1).clamp_min(0).mean(0).float() / b.shape[1]
    rot = [(v, a) for v, a in zip(videos, map(toy_data.parse_prompt, ev["prompts"])) if a["type"] == "rotating"]  # rad/frame the prompted way (probe: weak)
    row["rotation"] = float(np.mean([metrics.rotation_rate(v, 4 if a["shape"] == "square" else 3).item() * (1 if a["motion"] == "clockwise" else -1) for v, a in rot])) if rot else None
    return {**{k + tag: v for k, v in row.items()}, f"drift{tag}": float(d.mean()), f"drift_per_frame{tag}": d.tolist()}


@torch.no_grad()
def generate_videos(model, teacher, words, frames, args, device, amp, gen, **kw):
    """Videos in [0, 1] for word ids: students stream through `rollout` (kw: cache, on_step), the teacher solves its ODE."""
    noise = torch.randn(len(words), frames, 3, args.resolution, args.resolution, generator=gen, device=device)
    with amp:
        x = (sample_teacher(model, noise, words.to(device), ODE_EULER, args.shift, args.guidance)[0] if teacher
             else rollout(model, noise, words.to(device), few_step_sigmas(args.denoise_steps, args.shift), gen, **kw))
    return ((x.float() + 1) / 2).clamp(0, 1).cpu()


def measure_speed(model, teacher, words, frames, args, device, amp, cache=True):
    """One video at a time, best of 5 calls (as timeit advises: other work on the machine only slows a call down): frames/s and
    the first chunk's latency (a one-chunk video; teacher: the whole video), with the KV cache or recomputing the prefix (cache=False)."""
    t = [metrics.measure_fps(generate_videos, model, teacher, words, n, args, device, amp, torch.Generator(device).manual_seed(0), num_frames=n,
                             repeats=5, **({} if teacher else {"cache": cache}))["s_per_call_min"] for n in ((frames,) if teacher else (frames, args.chunk))]
    return frames / t[0], t[-1]  # the teacher's first frames come with its whole video: one measurement


@torch.no_grad()
def evaluate(model, stage, ev, args, device, amp, speed=True):
    """Score generations for the eval prompts at 1x and 2x the training length (students: rolling cache; teacher: all
    frames at once); speed: frames/s and first-chunk latency with the KV cache and without (nocache), at 1x and 4x."""
    gen, teacher = torch.Generator(device).manual_seed(args.seed + 5), stage == "teacher"
    v1 = generate_videos(model.eval(), teacher, ev["words"], args.frames, args, device, amp, gen)
    row = {**score(v1, ev), **score(generate_videos(model, teacher, ev["words"], 2 * args.frames, args, device, amp, gen), ev, "_2x")}
    for frames, tag in ((args.frames, ""), (4 * args.frames, "_4x")) if speed else ():
        for cache, key in ((True, tag), (False, tag + "_nocache"))[:1 if teacher else 2]:
            row[f"gen_frames_per_s{key}"], row[f"first_chunk_latency_s{key}"] = measure_speed(model, teacher, ev["words"][:1], frames, args, device, amp, cache)
        if not teacher:
            row[f"kv_speedup{tag or '_1x'}"] = row[f"gen_frames_per_s{tag}"] / row[f"gen_frames_per_s{tag}_nocache"]
    return row, v1


# ----------------------------------------------------------------------------- pictures
def save_pictures(model, videos, prompts, stage, args, device, amp, step, writer):
    """Samples, the attention masks by frame (white: visible) and, for a student, each chunk's x0 after each step."""
    out = lambda *p: os.path.join(args.out_dir, *p)
    viz.save_video_grid(videos[:16], out("samples", f"{stage}_{step:06d}.gif"), prompts[:16], fps=4)
    viz.save_video_grid(videos[:7], out("samples", f"{stage}_latest.png"), prompts[:7])
    viz.log_video(writer, f"samples/{stage}", videos[:16], step, fps=4)
    k, m = 256 // args.frames, torch.stack([torch.ones(args.frames, args.frames), frame_mask(args.frames, args.chunk, args.window).float()])
    viz.save_video_grid(torch.kron(m, torch.ones(k, k))[:, None, None].expand(-1, -1, 3, -1, -1), out("plots", "attention_masks.png"), [
        "teacher, critic: every frame sees every frame (rows: query frame, columns: key frame)", f"student: chunks of {args.chunk}, window {args.window or 'all'}"])
    if model is not None and stage != "teacher":
        rows, gen = [[] for _ in range(args.denoise_steps)], torch.Generator(device).manual_seed(args.seed)
        generate_videos(model, False, torch.tensor([encode_prompt(HOLDOUT[0])]), args.frames, args, device, amp, gen,
                        on_step=lambda b, j, x0: rows[j].append(x0[0].float().cpu()))
        viz.save_video_grid(((torch.stack([torch.cat(r) for r in rows]) + 1) / 2).clamp(0, 1), out("samples", f"denoising_{stage}.png"),
                            [f"{HOLDOUT[0]}: every chunk's x0 after step {j + 1} of {args.denoise_steps}" for j in range(args.denoise_steps)])


# ----------------------------------------------------------------------------- boilerplate
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
              "A10": 125e12, "V100": 125e12, "T4": 65e12}  # dense bf16/fp16 tensor-core peaks


def cpu_has_bf16():
    try:  # Linux only; elsewhere fp32 is the safe default
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in (flags := f.read()) or "amx_bf16" in flags
    except OSError:
        return False


def rng_state(data):
    """Every RNG state as tensors and lists, so the checkpoint loads with weights_only=True."""
    py, npr = random.getstate(), np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]], "numpy": [npr[0], torch.from_numpy(npr[1].astype(np.int64)), *npr[2:]],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "data": data}


def set_rng_state(s, rank):
    """Restore rng_state(); -> this rank's data-generator state (None if the world size changed)."""
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    np.random.set_state((s["numpy"][0], s["numpy"][1].numpy().astype(np.uint32), *s["numpy"][2:]))
    torch.set_rng_state(s["torch"])
    torch.cuda.set_rng_state_all(s["cuda"]) if s["cuda"] and torch.cuda.is_initialized() else None
    return s["data"][rank] if rank < len(s["data"]) else None


def load_checkpoint(path, arch):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); pass a valid --ckpt or use a new --out-dir")
    if not isinstance(ckpt, dict) or ckpt.get("script") != "train_self_forcing.py":
        got = ckpt.get("script", "an unknown script") if isinstance(ckpt, dict) else "an unknown script"
        raise SystemExit(f"error: {path} was written by {got}, not train_self_forcing.py; pass a train_self_forcing.py checkpoint with --ckpt or use another --out-dir")
    diff = [f"{k}={ckpt.get('arch', {}).get(k)} (now {v})" for k, v in arch.items() if ckpt.get("arch", {}).get(k) != v]
    if diff:
        raise SystemExit(f"error: {path} has another architecture: {', '.join(diff)}; pass the same model flags/data, or use another --out-dir")
    return ckpt


@torch.no_grad()
def ema_update(ema, model, decay):
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)  # as torch.optim.swa_utils does


def lr_at(step, total, peak, warmup, decay=True):
    warm, progress = min(1.0, (step + 1) / max(1, warmup)), min(1.0, step / max(1, total))
    return peak * warm * ((0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))) if decay else 1.0)


def main(args: Args):
    if args.explain:  # the method's functions, top to bottom in this file
        return print("\n\n".join(f"{f.__name__}: {' '.join(f.__doc__.split())}" for f in (DiT, frame_mask, few_step_sigmas,
                     flow_matching_loss, sample_teacher, ode_regression_loss, rollout, dmd_loss, evaluate)))
    # ---- distributed, device, precision
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    ddp, master = world > 1, rank == 0
    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible; use --device cpu")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if dev == "cuda" else dev)
    if dev == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if ddp and not dist.is_initialized():
        dist.init_process_group("nccl" if dev == "cuda" else "gloo")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if dev == "cuda" else (
        "bfloat16" if dev == "cpu" and cpu_has_bf16() else "float32")
    ptdtype = getattr(torch, dtype)
    amp = torch.autocast(device.type, dtype=ptdtype) if ptdtype != torch.float32 else nullcontext()
    use_compile = args.compile if args.compile is not None else dev == "cuda"
    random.seed(args.seed + rank), np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed)  # the same on every rank: identical initial weights

    # ---- inputs: validate everything before anything is written
    if args.data != "shapes":
        raise SystemExit(f"error: --data {args.data!r} has no prompts; this text-to-video script needs --data shapes")
    if args.resolution % PATCH or args.resolution < PATCH:
        raise SystemExit(f"error: --resolution {args.resolution} is not a positive multiple of {PATCH} (the patch size); use e.g. 32")
    if args.frames % args.chunk or ODE_EULER % args.denoise_steps or 0 < args.window < args.chunk:
        raise SystemExit(f"error: --frames {args.frames} must be a multiple of --chunk {args.chunk}, --denoise-steps {args.denoise_steps} "
                         f"divide {ODE_EULER}, and --window {args.window} be 0 or at least --chunk")
    gen_words = torch.tensor([encode_prompt(p) for p in args.generate], dtype=torch.long)
    if args.ckpt and not os.path.isfile(args.ckpt):
        raise SystemExit(f"error: --ckpt {args.ckpt} does not exist; pass the path of a train_self_forcing.py ckpt_<stage>.pt")
    stage_path = lambda s: os.path.join(args.out_dir, f"ckpt_{s}.pt")
    stages = STAGES if args.stage == "all" else (args.stage,)
    to_eval = [args.ckpt] if args.ckpt else [stage_path("self_forcing")] if args.generate else list(filter(os.path.isfile, map(stage_path, stages)))
    if (args.eval_only or args.generate) and not (to_eval and os.path.isfile(to_eval[0])):
        raise SystemExit(f"error: --{'generate' if args.generate else 'eval-only'} needs a checkpoint but there is no "
                         f"{(to_eval or ['ckpt_<stage>.pt'])[0]} in {args.out_dir}; train first or pass --ckpt")
    arch = dict(channels=3, resolution=args.resolution, patch=PATCH, width=args.width, depth=args.depth, chunk=args.chunk,
                window=args.window, vocab=len(VOCAB), words=MAX_WORDS)
    sigmas = few_step_sigmas(args.denoise_steps, args.shift)

    def load_model(path):
        ck, model = load_checkpoint(path, arch), DiT(**arch).to(device)
        try:
            model.load_state_dict(ck["ema"])
        except (RuntimeError, KeyError) as e:
            raise SystemExit(f"error: {path} does not match this model ({str(e).splitlines()[0][:120]}); use another --out-dir")
        return model, ck

    if args.generate:  # ---- streaming generation (rollout: chunk by chunk), then the speed of one video at a time
        (model, ck), out = load_model(to_eval[0]), os.path.join(args.out_dir, "generated.gif")
        videos = generate_videos(model.eval(), ck["stage"] == "teacher", gen_words, args.frames, args, device, amp, torch.Generator(device).manual_seed(0))
        fps, first = measure_speed(model, ck["stage"] == "teacher", gen_words[:1], args.frames, args, device, amp)
        viz.save_video_grid(videos, out, list(args.generate), fps=4)
        viz.save_video_grid(videos, out.replace(".gif", ".png"), list(args.generate))
        return print(f"{ck['stage']} model of {to_eval[0]} (step {ck['step']}), {dev} {dtype}, {args.frames} frames per video: {fps:.0f} frames/s, "
                     f"first chunk after {1000 * first:.1f} ms; wrote {out} and .png")

    # ---- evaluation (rank 0): clips of the held-out prompts, the row of real videos; each stage's row is merged into metrics.json
    ev, writer = dict(zip(("videos", "words", "prompts"), load_clips(args, args.eval_clips, "val", only=HOLDOUT))) if master else None, None
    if master:  # real clips of the same prompts, other layouts: the reference of fd_probe and drift
        ev["videos"], ev["test"] = ev["videos"].float() / 255, load_clips(args, args.eval_clips, "test", only=HOLDOUT)[0].float() / 255
    real = score(ev["videos"], ev) if master else None
    if master and real.get("prompt_alignment_unavailable"):  # say so now, not after 25 minutes of training
        print(f"warning: {real['prompt_alignment_unavailable']}; until then there is no prompt_alignment or fd_probe", flush=True)

    def finish(stage, model, step, perf):
        t0, path = time.time(), os.path.join(args.out_dir, "metrics.json")
        row, v1 = evaluate(model, stage, ev, args, device, amp)
        for k, v in row.items():
            if writer and isinstance(v, float):
                writer.add_scalar(("perf/" if k.startswith(("gen_", "first_", "kv_")) else "eval/") + f"{stage}/{k}", v, step)
        save_pictures(model, v1, ev["prompts"], stage, args, device, amp, step, writer)
        old = json.load(open(path)) if os.path.isfile(path) else {}
        old = old if old.get("script") == "train_self_forcing.py" else {}  # another script's metrics.json is replaced
        rows = {**old.get("baselines", {}), "self_forcing": old.get("eval"), stage: row, "real": real}
        perfs = {**old.get("perf", {}).get("stages", {}), **({stage: {**perf, "eval_s": round(time.time() - t0, 1)}} if perf else {})}
        sf = rows["self_forcing"] or {}
        with open(path, "w") as f:
            json.dump({"script": "train_self_forcing.py", "step": perfs.get("self_forcing", {}).get("steps", step),
                       "wall_s": round(sum(p["wall_s"] + p["eval_s"] for p in perfs.values()), 1), "eval": sf,
                       "baselines": {k: rows[k] for k in (*STAGES, "real") if rows.get(k) and k != "self_forcing"},
                       "perf": {**perfs.get("self_forcing", {}), **{k: v for k, v in sf.items() if k.startswith(("gen_", "first_", "kv_"))}, "stages": perfs},
                       "data": {"kind": args.data, "resolution": args.resolution, "frames": args.frames, "n_eval": args.eval_clips}}, f, indent=1)
        viz.plot_metric_vs_horizon({k: r["drift_per_frame_2x"] for k, r in rows.items() if r and "drift_per_frame_2x" in r}, os.path.join(
            args.out_dir, "plots", "drift.png"), metric="MSE to nearest real frame", train_horizon=args.frames, title="drift at 2x the training length")
        print(f"eval {stage} step {step}: " + "  ".join(f"{k} {row[k]:.4g}" for k in ("prompt_alignment", "prompt_alignment_2x", "fd_probe", "fd_probe_2x",
              "drift", "drift_2x", "rotation", "gen_frames_per_s", "first_chunk_latency_s", "kv_speedup_1x", "kv_speedup_4x") if row.get(k) is not None), flush=True)

    for sub in ("samples", "plots") if master else ():
        os.makedirs(os.path.join(args.out_dir, sub), exist_ok=True)
    if args.eval_only:
        for model, ck in map(load_model, to_eval if master else ()):
            finish(ck["stage"], model, ck["step"], None)
        if ddp:
            dist.barrier(), dist.destroy_process_group()  # rank 0 may still be evaluating: leave the group together
        return

    pool, pool_words, _ = load_clips(args, args.train_clips, "train", rank, world, HOLDOUT)  # (clips, T, C, H, W) uint8
    if master:
        with open(os.path.join(args.out_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=1)
        writer = SummaryWriter(args.out_dir)
        writer.add_text("args", "| flag | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in asdict(args).items()), 0)
        print(f"train_self_forcing: {sum(p.numel() for p in DiT(**arch).parameters()) / 1e6:.2f}M params per model, {dev} {dtype}, compile {use_compile}, "
              f"world {world}, {len(pool)} training clips/rank of {args.data}, stages {', '.join(stages)}; outputs in {args.out_dir}", flush=True)

    def train_stage(stage):
        si, dmd = STAGES.index(stage), stage in ("self_forcing", "tf", "df")
        total, B = {"teacher": args.teacher_steps, "ode": args.ode_steps}.get(stage, args.steps), args.batch_size // 2 if dmd else args.batch_size
        ckpt = load_checkpoint(stage_path(stage), arch) if args.resume and os.path.isfile(stage_path(stage)) else None
        if ckpt and ckpt["step"] >= total:  # finished: skipped (--no-resume retrains it)
            return
        for need in STAGES[:min(si, 2)]:  # ode needs the teacher; the DMD stages the teacher and the ODE student
            if not os.path.isfile(stage_path(need)):
                raise SystemExit(f"error: --stage {stage} needs {stage_path(need)}; run --stage {need} first (or --stage all)")
        t_stage, _ = time.time(), torch.manual_seed(args.seed + si)
        raw, teacher = DiT(**arch).to(device), None
        if stage != "teacher":  # the student starts from the teacher (ode) or the ODE student (DMD stages)
            raw.load_state_dict(load_model(stage_path(STAGES[min(si, 2) - 1]))[0].state_dict())
            teacher = load_model(stage_path("teacher"))[0].requires_grad_(False)
        critic = copy.deepcopy(teacher).requires_grad_(True) if dmd else None  # the fake score starts as the teacher, like Wan's
        ema = copy.deepcopy(raw).requires_grad_(False)
        betas, base_lr = ((0.0, 0.999), args.gen_lr) if dmd else ((0.9, 0.99), args.lr if stage == "teacher" else args.lr / 3)
        opt = torch.optim.AdamW(raw.parameters(), lr=base_lr, betas=betas, fused=dev == "cuda")
        opt_c = torch.optim.AdamW(critic.parameters(), lr=args.gen_lr, betas=betas, fused=dev == "cuda") if dmd else None
        scaler = torch.amp.GradScaler(device.type, enabled=ptdtype == torch.float16)
        gen = torch.Generator().manual_seed(args.seed + 1000 * rank + 10 * si)  # batches
        ngen = torch.Generator(device).manual_seed(args.seed + 1000 * rank + 10 * si + 1)  # noise, sigmas, exit steps
        step = ckpt["step"] if ckpt else 0
        if ckpt:
            raw.load_state_dict(ckpt["model"]), ema.load_state_dict(ckpt["ema"])
            opt.load_state_dict(ckpt["optimizer"]), scaler.load_state_dict(ckpt["scaler"])
            if dmd:
                critic.load_state_dict(ckpt["critic"]), opt_c.load_state_dict(ckpt["opt_critic"])
            data_state = set_rng_state(ckpt["rng"], rank)
            if data_state is not None:
                gen.set_state(data_state[0]), ngen.set_state(data_state[1])
        if stage == "ode":  # regenerated on resume: a fixed seed makes them the same pairs
            pairs = (*make_ode_pairs(teacher, pool_words[:ODE_PAIRS], args, device, amp, args.seed + 100 + rank), pool_words[:ODE_PAIRS])
        model = torch.compile(raw) if use_compile else raw

        def batch(n):
            i = torch.randint(len(pool), (n,), generator=gen)
            return pool[i].to(device).float() / 127.5 - 1, pool_words[i].to(device)  # videos in [-1, 1]

        def step_opt(o, loss, module):
            o.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            for p in module.parameters() if ddp else ():  # DDP by hand: the rollout calls the model many times per backward
                dist.all_reduce(p.grad.div_(world))
            scaler.unscale_(o)
            torch.nn.utils.clip_grad_norm_(module.parameters(), GRAD_CLIP)
            scaler.step(o)
            scaler.update()

        def student_sample():
            """The generator's videos: its rollout from noise (the batch gives only prompts) or, tf/df, from real chunks."""
            x, w = batch(B)
            s = sample_exit_step(ngen, len(sigmas), device, ddp) if stage == "self_forcing" else -1
            with amp:
                return rollout(model, torch.randn(x.shape, generator=ngen, device=device), w, sigmas, ngen, exit_step=s,
                               real=None if stage == "self_forcing" else (x, stage == "tf")), w, s

        def update():
            """One training step of the stage -> its loss terms."""
            if stage == "teacher":
                x, w = batch(B)
                with amp:  # 10% null prompts for CFG
                    loss = flow_matching_loss(model, x, torch.where(torch.rand(B, 1, generator=gen).to(device) < 0.1, 0, w),
                                              sample_sigma(B, args.shift, ngen, device), torch.randn(x.shape, generator=ngen, device=device))
            elif stage == "ode":
                with amp:
                    i = torch.randint(len(pairs[0]), (B,), generator=gen)
                    loss = ode_regression_loss(model, pairs[0][i].to(device).float(), pairs[1][i].to(device).float(), pairs[2][i].to(device), sigmas, ngen)
            if not dmd:
                step_opt(opt, loss, raw)
                return [loss.item()]
            for _ in range(args.critic_updates):  # the critic follows the generator's current outputs
                with torch.no_grad():
                    x, w, _ = student_sample()
                with amp:
                    critic_loss = flow_matching_loss(critic, x, w, sample_sigma(B, args.shift, ngen, device, 0.02, 0.98),
                                                     torch.randn(x.shape, generator=ngen, device=device))
                step_opt(opt_c, critic_loss, critic)
            x, w, s = student_sample()
            with amp:
                loss, g = dmd_loss(x, teacher, critic, w, sample_sigma(B, args.shift, ngen, device, 0.02, 0.98),
                                   torch.randn(x.shape, generator=ngen, device=device), args.guidance)
            step_opt(opt, loss, raw)
            return [loss.item(), critic_loss.item(), g.abs().mean().item(), s]

        def save_checkpoint(step):
            """All ranks call this (the generator states are gathered); rank 0 writes atomically."""
            gens = [[gen.get_state(), ngen.get_state()]]
            if ddp:
                gens = [None] * world
                dist.all_gather_object(gens, [gen.get_state(), ngen.get_state()])
            if not master:
                return
            ck = {"script": "train_self_forcing.py", "stage": stage, "step": step, "args": asdict(args), "arch": arch,
                  "model": raw.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                  "scaler": scaler.state_dict(), "rng": rng_state(gens)}
            ck.update({"critic": critic.state_dict(), "opt_critic": opt_c.state_dict()} if dmd else {})
            torch.save(ck, stage_path(stage) + ".tmp")
            os.replace(stage_path(stage) + ".tmp", stage_path(stage))

        flops = None  # one training step, counted once, for MFU
        peak = next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name(device)), None) if dev == "cuda" else None
        names = ["dmd", "critic", "g_abs", "exit_step"] if dmd else ["loss"]

        # ---- loop
        WARMUP = 3  # first steps (compile, allocator warm-up) stay out of the speed figures
        start, t_last = step, time.perf_counter()
        train_time, train_steps, win_time, win_steps = 0.0, 0, 0.0, 0
        acc, n_acc = torch.zeros(len(names), device=device), 0

        def reduced_means():
            """Mean of the accumulated loss terms over steps and ranks; stops on a non-finite loss or weight."""
            v = acc.clone()
            if ddp:
                dist.all_reduce(v)
            v = (v / max(1, n_acc * world)).tolist()
            if not all(math.isfinite(x) for x in v) or not all(p.isfinite().all() for p in [*raw.parameters(), *(critic.parameters() if dmd else [])]):
                raise SystemExit(f"error: non-finite loss ({dict(zip(names, v))}) in stage {stage} before step {step}; lower --lr/--gen-lr "
                                 f"or use --dtype float32; the last good checkpoint was kept")
            return dict(zip(names, v))

        try:
            while step < total:
                lr = lr_at(step, total, base_lr, 10 if dmd else 100, decay=not dmd)
                for group in opt.param_groups:
                    group["lr"] = lr
                if peak and flops is None and step == start + WARMUP:
                    from torch.utils.flop_counter import FlopCounterMode
                    with FlopCounterMode(display=False) as fc:
                        terms = update()
                    flops = fc.get_total_flops()
                else:
                    terms = update()
                ema_update(ema, raw, EMA_DECAY if step >= total // 3 else 0.0)  # the paper's EMA starts at step 200 of 600
                acc += torch.tensor(terms, device=device)
                n_acc, step = n_acc + 1, step + 1

                if step > start + WARMUP + (1 if peak else 0):
                    win_time, win_steps = win_time + time.perf_counter() - t_last, win_steps + 1
                if step % args.log_every == 0 or step == total:
                    m = reduced_means()
                    ms = 1000 * win_time / max(1, win_steps)
                    mfu = flops * 1000 / ms / peak if flops and win_steps else None
                    if master:
                        speed = (f"{ms:.0f} ms/step | {B * world * 1000 / ms:.0f} samples/s | MFU "
                                 f"{f'{mfu:.1%}' if mfu else 'n/a'} | ETA {(total - step) * ms / 60000:.1f} min") if win_steps else "warm-up"
                        print(f"{stage} step {step}/{total} | " + " ".join(f"{k} {v:.4g}" for k, v in m.items()) + f" | lr {lr:.2e} | {speed}", flush=True)
                        perf = {"steps_per_s": 1000 / ms, "samples_per_s": B * world * 1000 / ms, "mfu": mfu} if win_steps else {}
                        for group, k, v in [*(("train", k, v) for k, v in {**m, "lr": lr}.items()), *(("perf", k, v) for k, v in perf.items() if v)]:
                            writer.add_scalar(f"{group}/{stage}/{k}", v, step)
                    acc.zero_()
                    n_acc, train_time, train_steps, win_time, win_steps = 0, train_time + win_time, train_steps + win_steps, 0.0, 0
                if master and step < total and step % args.eval_every == 0:  # the final one follows the loop
                    finish(stage, ema, step, None)
                if master and step < total and step % args.sample_every == 0:
                    videos = generate_videos(ema, stage == "teacher", ev["words"][:16], args.frames, args, device, amp,
                                             torch.Generator(device).manual_seed(args.seed + 5))
                    save_pictures(None, videos, ev["prompts"][:16], stage, args, device, amp, step, writer)
                if step % args.ckpt_every == 0 or step == total:
                    reduced_means()  # never save weights that have gone non-finite since the last log
                    save_checkpoint(step)
                t_last = time.perf_counter()  # evaluation and checkpoint time stay out of the speed figures
        except KeyboardInterrupt:
            reduced_means()
            save_checkpoint(step)
            raise SystemExit(f"interrupted at step {step} of stage {stage}; checkpoint saved in {stage_path(stage)}, run the same command to resume")

        if master:
            finish(stage, ema, step, {"steps": step, "wall_s": round(time.time() - t_stage, 1), "params": sum(p.numel() for p in raw.parameters()),
                                      "train_samples_per_s": B * world * train_steps / train_time if train_time else None,
                                      "mfu": flops * train_steps / train_time / peak if flops and train_time else None,
                                      "device": torch.cuda.get_device_name(device) if dev == "cuda" else dev, "dtype": dtype})
        if ddp:
            dist.barrier()  # the next stage starts from this stage's checkpoint

    t_run = time.time()
    for stage in stages:
        train_stage(stage)
    if master:
        writer.close()
        viz.plot_training_curves(args.out_dir, os.path.join(args.out_dir, "plots", "training_curves.png"))
        print(f"all done in {(time.time() - t_run) / 60:.1f} min; outputs in {args.out_dir}; tensorboard --logdir {args.out_dir}")
    if ddp:
        dist.barrier(), dist.destroy_process_group()  # rank 0 may still be evaluating: leave the group together


if __name__ == "__main__":
    main(tyro.cli(Args))
