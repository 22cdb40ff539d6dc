"""VideoGPT: a GPT over the codes of a spatio-temporal VQ-VAE, on Moving MNIST.

The frozen first stage (`train_vqvae.py --temporal-downsample 2 --spatial-downsample 4
--local-codes`; VideoGPT's Moving MNIST setting shrinks time by 4, which blurred the digits here)
turns a clip of 16 frames of 32x32 (64x64 on a GPU) into an 8 x 8 x 8 (8 x 16 x 16) grid of codes
of 64, each code from its own cell of 2 x 4 x 4 pixels (so every black cell takes one code, and the
prior's bits go to the digits; VideoGPT's own encoder spreads the black cells over most codes, see
docs/results/train_videogpt.md). A causal transformer learns the grid flattened in raster order
(time, then rows, then columns): each code is predicted from every code before it. Sampling draws
one code at a time with a KV cache (temperature, top-k) and the first stage decodes the grid.
Frame-conditional generation encodes the first --context frames and continues their codes.

Paper: Yan, Zhang, Abbeel, Srinivas, "VideoGPT: Video Generation using VQ-VAE and Transformers"
(2021). Faithful: the frozen codebook vectors as inputs (a linear map to the width), a learned
start token with the sequence shifted right, a position code factored over time, rows and columns
(three learned tables, concatenated), pre-LN blocks (causal attention; MLP 4x with GELU as
x * sigmoid(1.702 x); dropout on the residual branches, off by default here, none on the
attention weights, as the paper's BAIR prior), a zero-initialised output head (the loss starts at
ln K), the mean cross-entropy over every code, Adam with gradient clipping at 1, ancestral sampling
at temperature 1. Deviations: dense causal attention over the 512 codes (the released models use
sparse, strided-block attention for their longer sequences); small widths and a short schedule for
a CPU (3000 steps of 8 clips at lr 2e-3, no dropout; the paper: 3e-4 over 100k+ steps); a linear
warm-up and a cosine to lr/10 (the paper: cosine to 0, no warm-up); the Moving MNIST frames at
32 px on a CPU; the conditioning frames enter as the codes of their own latent frames, a prefix the
prior continues (the paper encodes them with a separate ResNet and attends to them by
cross-attention, because its encoder sees later frames; ours is causal in time, so the codes of
the first k * dt frames depend on those frames alone), so one prior samples with and without
conditioning; optional top-k.

    python train_vqvae.py --data moving_mnist --resolution 32 --temporal-downsample 2 \\
        --spatial-downsample 4 --local-codes --width 32 --latent-channels 8 --codebook-size 64 \\
        --recon-loss mse --batch-size 8 --train-clips 512 --steps 2400 --lr 2e-3 \\
        --out-dir runs/train_vqvae_3d               # the first stage (2-core CPU: ~5 min)
    python train_videogpt.py                        # 2-core CPU: ~17 min, Moving MNIST
    python train_videogpt.py --resolution 64 --vqvae runs/train_vqvae_3d_64 --width 576 \\
        --layers 8 --batch-size 32 --steps 50000 --lr 3e-4 --dropout 0.1
                        # GPU: 8 x 16 x 16 codes, after the first stage above at --resolution 64
    torchrun --standalone --nproc_per_node=2 train_videogpt.py  # DDP (nccl on CUDA, gloo on CPU)
    python train_videogpt.py --eval-only --temperature 0.8 --top-k 32 --out-dir runs/vgpt_t08 \\
        --ckpt runs/train_videogpt/ckpt.pt         # evaluate and sample again
    OMP_NUM_THREADS=1 python train_videogpt.py      # CPU shared with other jobs: far faster

Outputs in --out-dir: ckpt.pt, args.json, metrics.json (held-out bits per code, per latent frame
and per pixel dimension against a unigram model of the codes; prediction of the frames after
--context against copy_last, black frames and the first stage's own reconstruction; fd_probe of
unconditional samples against real clips, with real, black, frozen, frame-shuffled and noise
references; sampling speed with and without the KV cache), TensorBoard events (train/, eval/, perf/,
samples/), samples/ (unconditional_*.gif, conditional_*.gif: truth | prediction | error, context
marked; *_latest.png), plots/ (horizon*.png, training_curves.png).
"""

import functools
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
    steps: int = 3000
    """training steps (one batch per process each)"""
    seed: int = 0
    """random seed: model init, data sets, batch order and sampling"""
    out_dir: str = "runs/train_videogpt"
    """folder for ckpt.pt, metrics.json, TensorBoard events, samples/ and plots/"""
    resume: bool = True
    """continue from --ckpt (or out_dir/ckpt.pt) when it exists"""
    eval_only: bool = False
    """evaluate the checkpoint, write metrics.json, samples and plots, then exit"""
    ckpt: str | None = None
    """checkpoint to resume or evaluate; None: out_dir/ckpt.pt"""
    accept_changed_args: bool = False
    """resume even if flags that shape the run (steps, lr, batch size, data, ...) differ from the
    checkpoint's (the schedule then changes mid-run)"""
    log_every: int = 50
    """print and log training losses every N steps"""
    eval_every: int = 500
    """held-out bits per code ('val' clips) every N steps; the full evaluation runs at the end"""
    sample_every: int = 500
    """write sample GIFs every N steps"""
    ckpt_every: int = 250
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
    data: str = "moving_mnist"
    """data kind (must match the first stage): moving_mnist, shapes, bouncing_balls, pendulum,
    falling, projectile, smoke, folder or npz"""
    data_dir: str | None = None
    """folder of videos (--data folder), .npz file (--data npz) or MNIST files
    (--data moving_mnist)"""
    resolution: int = 32
    """frame size in pixels (must match the first stage)"""
    frames: int = 16
    """frames per clip (must match the first stage)"""
    context: int = 4
    """observed frames of frame-conditional prediction (a multiple of the first stage's temporal
    downsampling): their codes are kept, the rest of the clip is sampled"""
    train_clips: int = 16384
    """clips generated and encoded to codes once (split 'train'; 16,384 take about 30 s on a
    2-core CPU; 2,048 the prior overfits: 0.94 bits per code on them against 1.01 on 'val')"""
    eval_clips: int = 64
    """held-out clips (split 'test') for the final figures; as many 'val' clips for the periodic
    bits per code and as the real reference of fd_probe"""
    samples: int = 64
    """unconditional samples scored by fd_probe against the held-out clips"""
    bench_samples: int = 4
    """clips sampled with and without the KV cache to time it"""
    vqvae: str = "runs/train_vqvae_3d"
    """folder of the frozen spatio-temporal first stage written by train_vqvae.py
    --temporal-downsample N (first_stage.json, first_stage_{encode,decode}.pt2)"""
    # model
    width: int = 144
    """transformer width (divisible by 3: the position code is three tables of width/3)"""
    heads: int = 4
    """attention heads"""
    layers: int = 4
    """transformer blocks"""
    dropout: float = 0.0
    """dropout on the inputs, after attention and after the MLP (0: a short CPU run underfits, so
    there is nothing to regularise)"""
    attn_dropout: float = 0.0
    """dropout on the attention weights (as the paper's BAIR prior; also far faster on a CPU)"""
    # optim
    batch_size: int = 8
    """code sequences (clips) per batch per process"""
    lr: float = 2e-3
    """peak learning rate (Adam), after linear warm-up, cosine-decayed to lr/10 (paper: 3e-4 for
    far longer runs)"""
    warmup_steps: int = 100
    """linear learning-rate warm-up steps"""
    grad_clip: float = 1.0
    """clip the gradient norm to this (0: off)"""
    # sampling
    temperature: float = 1.0
    """softmax temperature of sampling (1: the model's own distribution)"""
    top_k: int = 0
    """sample only among the k most likely codes (0: all, as the paper)"""


# ------------------------------------------------------------------------------------------ model
class Attention(nn.Module):
    """Causal multi-head self-attention (q, k, v without bias; dropout on the attention weights).
    With a cache (a dict per layer) the new tokens attend to every earlier one, whose keys and
    values were kept by earlier calls; their own join the cache."""

    def __init__(self, width, heads, attn_dropout, max_len):
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.max_len = max_len
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x, cache=None, start=0):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if cache is None:
            p = self.attn_dropout if self.training else 0.0
            a = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            if not cache:  # full-length buffers: step i writes slot i
                shape = (B, self.heads, self.max_len, D // self.heads)
                cache.update(k=k.new_zeros(shape), v=v.new_zeros(shape))
            end = start + L
            cache["k"][:, :, start:end] = k
            cache["v"][:, :, start:end] = v
            # query start + i sees keys 0 .. start + i
            mask = torch.ones(L, end, dtype=torch.bool, device=x.device).tril(start)
            a = F.scaled_dot_product_attention(
                q, cache["k"][:, :, :end], cache["v"][:, :, :end], attn_mask=mask
            )
        return self.proj(a.transpose(1, 2).reshape(B, L, D))


class QuickGELU(nn.Module):
    """GELU as VideoGPT writes it: x * sigmoid(1.702 x)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN x), then x + MLP(LN x), dropout on both branches."""

    def __init__(self, width, heads, dropout, attn_dropout, max_len):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, attn_dropout, max_len)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), QuickGELU(), nn.Linear(4 * width, width)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x, cache=None, start=0):
        x = x + self.drop(self.attn(self.norm1(x), cache, start))
        return x + self.drop(self.mlp(self.norm2(x)))


class VideoGPT(nn.Module):
    """The prior over a (t, h, w) grid of codes of a frozen codebook (K, D), flattened in raster
    order. Token n sits at (t, h, w) = unravel_index(n, grid); its input is the codebook vector of
    code n - 1 (a learned start token for n = 0), mapped to the width, plus the position code
    concat(E_t[t], E_h[h], E_w[w])."""

    def __init__(self, codebook, grid, width=144, heads=4, layers=4, dropout=0.1, attn_dropout=0.1):
        super().__init__()
        self.grid = tuple(grid)
        self.n_tokens = math.prod(self.grid)
        self.register_buffer("codebook", codebook.float().clone())  # frozen: never trained
        self.embed = nn.Linear(codebook.shape[1], width, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.sos = nn.Parameter(torch.randn(width) * 0.02)
        self.pos = nn.ParameterList(nn.Parameter(torch.randn(n, width // 3) * 0.01) for n in grid)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(width, heads, dropout, attn_dropout, self.n_tokens) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, len(codebook), bias=False)
        nn.init.zeros_(self.head.weight)  # every code equally likely at the start: loss ln K

    def positions(self):
        """(N, width) position code of the flattened grid."""
        t, h, w = self.grid
        et, eh, ew = self.pos
        parts = (et[:, None, None], eh[None, :, None], ew[None, None, :])
        return torch.cat([p.expand(t, h, w, -1) for p in parts], -1).flatten(0, 2)

    def code_inputs(self, codes):
        """codes (B, L) -> their codebook vectors mapped to the width (B, L, width)."""
        return self.embed(self.codebook[codes])

    def shifted(self, codes):
        """Inputs of positions 0 .. L-1 for codes (B, L): the start token, then codes 0 .. L-2."""
        sos = self.sos.expand(len(codes), 1, -1)
        return torch.cat([sos, self.code_inputs(codes[:, :-1]).to(sos.dtype)], 1)

    def logits(self, x, start=0, caches=None):
        """Input vectors x (B, L, width) at positions start .. start+L-1 -> logits (B, L, K).
        caches: one dict per block (KV cache), or None for a plain causal pass from 0."""
        h = self.drop(x + self.positions()[start : start + x.shape[1]])
        for i, block in enumerate(self.blocks):
            h = block(h, None if caches is None else caches[i], start)
        return self.head(self.norm(h))

    def forward(self, codes):
        """codes (B, L) -> logits (B, L, K); the logits at n predict code n from codes 0 .. n-1."""
        return self.logits(self.shifted(codes))


# ----------------------------------------------------------------------------------------- method
def gpt_loss(model, codes, amp=nullcontext(), reduction="mean"):
    """THE LOSS: cross-entropy of every code given the codes before it, in fp32, averaged over the
    whole t x h x w grid (reduction "none": per code). -> (loss, logits)"""
    with amp:
        logits = model(codes)
    ce = F.cross_entropy(logits.float().flatten(0, 1), codes.flatten(), reduction=reduction)
    return ce, logits


def draw(logits, temperature=1.0, top_k=0, gen=None):
    """One code per row of logits (B, K): softmax at `temperature` over the top_k largest logits
    (0: all), drawn with `gen` on the CPU, so the draw is the same on every device."""
    logits = logits.float().cpu() / temperature
    if top_k:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]


@torch.no_grad()
def sample(
    model, n, prefix=None, temperature=1.0, top_k=0, gen=None, cache=True, amp=nullcontext()
):
    """THE SAMPLER: ancestral sampling of n code grids in raster order, one code at a time. prefix
    (n, P): given codes (the first frames), kept as they are. cache: every step feeds one token and
    the blocks keep the keys and values of the earlier ones; without, every step runs the whole
    sequence so far again. -> codes (n, N)"""
    dev = model.codebook.device
    codes = torch.zeros(n, model.n_tokens, dtype=torch.long, device=dev)
    P = 0 if prefix is None else prefix.shape[1]
    if P:
        codes[:, :P] = prefix.to(dev)
    caches = [{} for _ in model.blocks] if cache else None
    for i in range(P, model.n_tokens):
        with amp:
            if not cache:
                logits = model(codes[:, : i + 1])[:, -1]
            elif i == P:  # the start token and the given codes: positions 0 .. P in one pass
                logits = model.logits(model.shifted(codes[:, : P + 1]), 0, caches)[:, -1]
            else:  # one new token: the code drawn last, at position i
                logits = model.logits(model.code_inputs(codes[:, i - 1 : i]), i, caches)[:, -1]
        codes[:, i] = draw(logits, temperature, top_k, gen).to(dev)
    return codes


@torch.no_grad()
def sequence_nll(model, codes, amp=nullcontext(), batch=32):
    """Negative log-likelihood of every code of every grid (N, n_tokens), in nats (float64).
    -> (N, n_tokens)"""
    was_training = model.training
    model.eval()
    dev = model.codebook.device
    out = []
    for i in range(0, len(codes), batch):
        c = codes[i : i + batch].to(dev)
        ce = gpt_loss(model, c, amp, reduction="none")[0]
        out.append(ce.view(len(c), -1).double().cpu())
    model.train(was_training)
    return torch.cat(out)


def unigram_nll(counts, codes):
    """The baseline: every code drawn independently from the training codes' frequencies (add-one
    smoothing). counts (K,), codes (N, n_tokens) -> NLL per grid in nats (N,), float64."""
    p = (counts.double() + 1) / (counts.double().sum() + len(counts))
    return -p.log()[codes].sum(1)


def bits(nll, n_tokens, dims):
    """Summed NLLs per clip (nats) -> bits per code and bits per pixel dimension, dims = T x C x H x
    W of a clip: a latent likelihood through the first stage's compression, not a pixel model's."""
    per_clip = float(nll.mean()) / math.log(2)
    return {"bits_per_token": per_clip / n_tokens, "bits_per_dim": per_clip / dims}


# --------------------------------------------------------------------------- first stage and data
FIRST_STAGE_FLAGS = (  # train_vqvae.py's spatio-temporal first stage, as the docstring makes it
    "--temporal-downsample 2 --spatial-downsample 4 --local-codes --width 32 --latent-channels 8 "
    "--codebook-size 64 --recon-loss mse --batch-size 8 --train-clips 512 --steps 2400 --lr 2e-3"
)


def first_stage_command(args, out):
    """The train_vqvae.py command that makes a first stage for these data flags in `out`."""
    flags = [
        f"--data {args.data}",
        f"--data-dir {shlex.quote(str(args.data_dir))}" * bool(args.data_dir),
        f"--resolution {args.resolution}",
        f"--frames {args.frames}" * (args.frames != 16),
        FIRST_STAGE_FLAGS,
        f"--out-dir {shlex.quote(out)}",
    ]
    return " ".join(["python train_vqvae.py", *filter(None, flags)])


def read_meta(path, args):
    """first_stage.json of path, checked: written by train_vqvae.py in its spatio-temporal mode,
    for these data flags. -> (meta, its bytes)"""
    make = f"make one with `{first_stage_command(args, path)}`"
    try:
        with open(os.path.join(path, "first_stage.json"), "rb") as f:
            raw = f.read()
        meta = json.loads(raw)
    except (OSError, ValueError):
        raise SystemExit(f"error: no readable first stage in {path} (first_stage.json); {make}")
    if not isinstance(meta, dict) or meta.get("script") != "train_vqvae.py":
        raise SystemExit(
            f"error: {path}/first_stage.json was not written by train_vqvae.py; {make}"
        )
    if "temporal_downsample" not in meta or "codebook" not in meta:
        raise SystemExit(
            f"error: the first stage in {path} is a per-frame (2D) VQ-VAE, but VideoGPT needs "
            f"codes over time; {make}"
        )
    want = (args.data, args.resolution, args.frames)
    got = (meta.get("data"), meta.get("resolution"), meta.get("frames"))
    if got != want:
        raise SystemExit(
            f"error: the first stage in {path} was trained on --data {got[0]} at {got[1]} px with "
            f"{got[2]} frames, not --data {want[0]} at {want[1]} px with {want[2]} frames; pass "
            f"those flags or {make}"
        )
    return meta, raw


@functools.lru_cache(maxsize=4)
def load_program(path, mtime):
    """An exported program, frozen; loaded once per file version and process (it takes seconds)."""
    return torch.export.load(path).module().requires_grad_(False)


def load_first_stage(path, args):
    """The frozen spatio-temporal VQ-VAE of train_vqvae.py. -> (encode, decode: fp32 programs on
    whole clips; codebook (K, D)), meta, fingerprint"""
    meta, raw = read_meta(path, args)
    dt = meta["temporal_downsample"]
    if args.context % dt or not 0 < args.context < args.frames:
        raise SystemExit(
            f"error: --context {args.context} must be a multiple of the first stage's temporal "
            f"downsampling {dt} and less than --frames {args.frames}; use e.g. --context {dt}"
        )
    files = [os.path.join(path, f"first_stage_{name}.pt2") for name in ("encode", "decode")]
    try:
        encode, decode = (load_program(f, os.path.getmtime(f)) for f in files)
        codebook = torch.tensor(meta["codebook"], dtype=torch.float32)
    except Exception as e:
        raise SystemExit(
            f"error: cannot load the first stage in {path} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:100] if str(e) else ''}); make one with "
            f"`{first_stage_command(args, path)}`"
        )
    return (encode, decode, codebook), meta, hashlib.sha256(raw).hexdigest()[:12]


def codes_of(z, codebook):
    """Nearest code of every cell of z_e (B, D, t, h, w), flattened in raster order -> (B, N). The
    first stage's own rule (squared L2 by broadcasting, fp32), so the codes are the ones it
    decodes."""
    flat = z.float().movedim(1, -1).unsqueeze(-2)  # (B, t, h, w, 1, D)
    return (flat - codebook).pow(2).sum(-1).argmin(-1).flatten(1)


@torch.no_grad()
def encode_codes(fs, clips, batch=8, what=None):
    """uint8 clips (N, T, C, H, W) -> code grids (N, n_tokens), with a progress line naming
    `what`."""
    encode, _, codebook = fs
    starts = range(0, len(clips), batch)
    shown = progress(starts, len(starts), f"{what} ({batch} clips a batch)", show=what is not None)
    return torch.cat(
        [codes_of(encode(clips[i : i + batch].float() / 255), codebook) for i in shown]
    )


@torch.no_grad()
def context_codes(fs, context, frames, n_codes):
    """The codes of the observed frames alone: the clip is padded to `frames` with copies of its
    last observed frame (the exported encoder takes whole clips) and the first n_codes codes are
    kept; the encoder is causal in time, so the padding cannot change them."""
    pad = context[:, -1:].expand(-1, frames - context.shape[1], *context.shape[2:])
    return encode_codes(fs, torch.cat([context, pad], 1))[:, :n_codes]


@torch.no_grad()
def decode_codes(fs, codes, grid, batch=16):
    """Code grids (N, n_tokens) -> clips (N, T, C, H, W) in [0, 1], by the first stage's decoder
    (CPU)."""
    _, decode, codebook = fs
    z = codebook[codes.cpu()].unflatten(1, grid).movedim(-1, 1)  # (N, D, t, h, w)
    return torch.cat([decode(z[i : i + batch]) for i in range(0, len(z), batch)]).clamp(0, 1)


def load_clips(args, n_clips, split, rank=0, world=1):
    """Generate clips once into a uint8 (N, T, C, H, W) tensor; rank r keeps clips r, r+world..."""
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
        # uint8 clip by clip: 16,384 clips kept as floats and stacked took 6.3 GB at peak
        clips = [(ds[i]["video"].clamp(0, 1) * 255).round().to(torch.uint8) for i in shown]
    finally:
        torch.set_num_threads(threads)
    if not clips:
        raise SystemExit(
            f"error: --data {args.data} gave no {split} clips; check --data-dir or raise "
            "--train-clips/--eval-clips"
        )
    return torch.stack(clips)


def unigram_counts(codes, K, rt):
    """How often each code occurs in the training grids of every rank -> (K,) float64."""
    counts = torch.bincount(codes.flatten(), minlength=K).double()
    if rt.ddp:
        counts = counts.to(rt.device)
        dist.all_reduce(counts)
    return counts.cpu()


# ------------------------------------------------------------------------------------- evaluation
def fd_probe_or_none(real, fake):
    """fd_probe of fake against real videos -> (score, None), or (None, why) without a probe."""
    try:
        return metrics.fd_probe(real, fake), None
    except metrics.MetricUnavailable as e:
        return None, str(e)


def sample_batches(model, n, prefix, args, amp, gen, batch=64):
    """sample() in batches of at most `batch` grids, at --temperature and --top-k -> (n, N)
    codes."""
    out = []
    for i in range(0, n, batch):
        p = None if prefix is None else prefix[i : i + batch]
        m = min(batch, n - i)
        out.append(sample(model, m, p, args.temperature, args.top_k, gen, True, amp).cpu())
    return torch.cat(out)


def prefix_len(args, grid):
    """Codes of the --context observed frames: whole latent frames of h x w codes."""
    return args.context // (args.frames // grid[0]) * grid[1] * grid[2]


def predict(model, fs, clips, args, grid, amp, gen):
    """Frame-conditional generation: the codes of the first --context frames of clips (N, T, C, H, W
    uint8) are kept, the rest is sampled and decoded. -> clips (N, T, C, H, W) in [0, 1]: the
    context as the first stage reconstructs it, then the prediction."""
    prefix = context_codes(fs, clips[:, : args.context], args.frames, prefix_len(args, grid))
    return decode_codes(fs, sample_batches(model, len(clips), prefix, args, amp, gen), grid)


def likelihood(model, codes, counts, dims, amp):
    """Held-out code grids: bits per code and per pixel dimension of the prior, of the unigram model
    of the training codes and of the uniform one (log2 K per code); the prior's bits per code of
    each latent frame too (a prior that uses the frames before costs less on later frames than on
    the first). -> (ours, baselines)"""
    n = codes.shape[1]
    uniform = math.log2(len(counts))
    baselines = {
        "unigram": bits(unigram_nll(counts, codes), n, dims),
        "uniform": {"bits_per_token": uniform, "bits_per_dim": uniform * n / dims},
    }
    nll = sequence_nll(model, codes, amp)
    ours = bits(nll.sum(1), n, dims)
    by_frame = nll.view(len(codes), model.grid[0], -1).mean((0, 2)) / math.log(2)
    ours["bits_per_token_by_latent_frame"] = by_frame.tolist()
    return ours, baselines


def prediction(model, fs, clips, codes, args, grid, amp, gen):
    """Predict the frames after --context of held-out clips. Scores of the model, of copy_last, of
    black frames (on mostly black Moving MNIST they beat any prediction that puts a digit in the
    wrong place) and of the first stage's reconstruction of the truth (the best a prior over these
    codes can do), on the same frames, each with fd_probe of whole clips. -> (scores, per-frame
    curves, predicted clips)"""
    c = args.context
    truth = clips.float() / 255
    pred = predict(model, fs, clips, args, grid, amp, gen)
    context, target = truth[:, :c], truth[:, c:]
    scores, curves = metrics.score_prediction(pred[:, c:], context, target)
    others = {
        "black": torch.zeros_like(target),
        "first_stage": decode_codes(fs, codes, grid)[:, c:],
    }
    for name, video in others.items():
        scores[name], curves[name] = metrics.prediction_scores(video, target)
    videos = {"model": pred[:, c:], "copy_last": metrics.copy_last(context, target.shape[1])}
    for name, video in {**videos, **others}.items():
        fd, why = fd_probe_or_none(truth, torch.cat([context, video], 1))
        scores[name]["fd_probe"] = fd
        if why:
            scores[name]["fd_probe_unavailable"] = why
    return scores, curves, pred


def unconditional(model, fs, held, args, grid, amp, gen):
    """fd_probe of --samples unconditional samples against the held-out 'test' clips, and of
    references against the same clips: other real clips ('val'), the first stage's reconstructions
    of them, and degenerate videos made from them (black, first frame frozen, frames shuffled,
    uniform noise). -> (scores, references, sampled clips)"""
    videos = decode_codes(fs, sample_batches(model, args.samples, None, args, amp, gen), grid)
    real = held["test"][0].float() / 255
    other = held["val"][0].float() / 255
    g = torch.Generator().manual_seed(args.seed + 4)
    references = {
        "real": other,
        "first_stage": decode_codes(fs, held["val"][1], grid),
        **metrics.control_videos(other, g),
    }
    fd, why = fd_probe_or_none(real, videos)
    scores = {"fd_probe": fd} | ({"fd_probe_unavailable": why} if why else {})
    refs = {k: fd_probe_or_none(real, v)[0] for k, v in references.items()}
    return scores, refs, videos


def sampling_speed(model, args, amp):
    """Codes per second for --bench-samples whole grids drawn with and without the KV cache (the
    same seed), after a warm-up, and their ratio."""
    model.eval()
    n = args.bench_samples
    sample(model, n, None, args.temperature, args.top_k, torch.Generator(), True, amp)  # warm-up
    seconds = {}
    for cache in (True, False):
        gen = torch.Generator().manual_seed(args.seed)
        t0 = time.perf_counter()
        sample(model, n, None, args.temperature, args.top_k, gen, cache, amp)
        seconds[cache] = time.perf_counter() - t0
    model.train()
    codes = n * model.n_tokens
    return {
        "sample_tokens_per_s_cached": codes / seconds[True],
        "sample_tokens_per_s_uncached": codes / seconds[False],
        "kv_cache_speedup": seconds[False] / seconds[True],
        "bench_samples": n,
    }


def evaluate(model, fs, held, counts, meta, args, rt):
    """The final figures on the held-out 'test' clips (rank 0): likelihood, prediction,
    unconditional samples, sampling speed. -> (results for metrics.json, curves, videos)"""
    grid = meta["latent_shape"][1:]
    clips, codes = held["test"]
    dims = math.prod(clips.shape[1:])
    model.eval()
    gen = torch.Generator().manual_seed(args.seed + 2)
    nll, nll_base = likelihood(model, codes, counts, dims, rt.amp)
    pred_scores, curves, pred = prediction(model, fs, clips, codes, args, grid, rt.amp, gen)
    uncond, refs, videos = unconditional(model, fs, held, args, grid, rt.amp, gen)
    model.train()
    results = {
        "eval": {
            "likelihood": nll,
            "prediction": pred_scores.pop("model"),
            "unconditional": uncond,
        },
        "baselines": {"likelihood": nll_base, "prediction": pred_scores, "unconditional": refs},
        "sampling": sampling_speed(model, args, rt.amp),
    }
    return results, curves, {"truth": clips.float() / 255, "prediction": pred, "samples": videos}


def val_bits(model, held, counts, rt, step, writer=None):
    """Bits per code of the prior and of the unigram model on the 'val' grids: one console line and
    eval/ scalars (rank 0)."""
    clips, codes = held["val"]
    ours, base = likelihood(model, codes, counts, math.prod(clips.shape[1:]), rt.amp)
    if writer:
        log_scalars(writer, "eval", {f"val_{k}": v for k, v in ours.items()}, step)
    print(
        f"eval step {step}: val {ours['bits_per_token']:.3f} bits/code "
        f"({ours['bits_per_dim']:.5f} bits/dim); unigram {base['unigram']['bits_per_token']:.3f}, "
        f"uniform {base['uniform']['bits_per_token']:.3f}",
        flush=True,
    )


def save_samples(videos, args, step, writer):
    """Unconditional samples (GIF grid, still strip) and predictions (truth | prediction | error,
    context marked) in samples/ and TensorBoard."""
    out = os.path.join(args.out_dir, "samples")
    samples = videos["samples"][:16]
    viz.save_video_grid(samples, os.path.join(out, f"unconditional_{step:06d}.gif"), fps=4)
    viz.save_video_grid(samples[:4], os.path.join(out, "unconditional_latest.png"))
    viz.log_video(writer, "samples/unconditional", samples, step, fps=4)
    pair = {"truth": videos["truth"][:4], "prediction": videos["prediction"][:4]}
    gif = os.path.join(out, f"conditional_{step:06d}.gif")
    cmp = viz.create_video_comparison(pair, gif, context_frames=args.context)
    png = os.path.join(out, "conditional_latest.png")
    viz.create_video_comparison(pair, png, context_frames=args.context)
    viz.log_video(writer, "samples/truth_prediction_error", np.moveaxis(cmp, -1, 1), step, fps=4)


def demo_samples(model, fs, held, args, grid, amp):
    """A few unconditional samples and predictions of 'val' clips, for the GIFs during training."""
    model.eval()
    gen = torch.Generator().manual_seed(args.seed + 3)
    clips = held["val"][0][:4]
    samples = decode_codes(fs, sample_batches(model, 8, None, args, amp, gen), grid)
    pred = predict(model, fs, clips, args, grid, amp, gen)
    model.train()
    return {"truth": clips.float() / 255, "prediction": pred, "samples": samples}


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
    """metrics.json (rank 0)."""
    report = {
        "script": SCRIPT,
        "step": step,
        "wall_s": round(time.time() - t_start, 1),
        **{k: results[k] for k in ("eval", "baselines")},
        "perf": {**perf, **results["sampling"]},
        "sampler": {"temperature": args.temperature, "top_k": args.top_k},
        "data": {
            "kind": args.data,
            "resolution": args.resolution,
            "frames": args.frames,
            "context": args.context,
            "n_eval": args.eval_clips,
            "n_samples": args.samples,
            "split": "test",
            "first_stage": args.vqvae,
        },
    }
    write_json(os.path.join(args.out_dir, "metrics.json"), report)
    return report


def summary(report, args, trained):
    """The last line of a run: the headline figures and where every output is."""
    ev, base = report["eval"], report["baselines"]
    pred, copy = ev["prediction"], base["prediction"]["copy_last"]
    black = base["prediction"]["black"]
    fd = ev["unconditional"]["fd_probe"]
    files = "ckpt.pt, args.json, " * trained + "metrics.json, samples/, plots/"
    if trained:
        files += f", TensorBoard events (tensorboard --logdir {args.out_dir})"
    return (
        f"held out: {ev['likelihood']['bits_per_token']:.3f} bits/code (unigram "
        f"{base['likelihood']['unigram']['bits_per_token']:.3f}); {args.frames - args.context} "
        f"frames after {args.context}: PSNR {pred['psnr']:.2f} dB (copy_last {copy['psnr']:.2f}, "
        f"black frames {black['psnr']:.2f}), MSE/frame {pred['mse_frame_sum']:.1f} "
        f"({copy['mse_frame_sum']:.1f}, {black['mse_frame_sum']:.1f}); fd_probe of samples "
        f"{'n/a' if fd is None else f'{fd:.2f}'}; KV cache "
        f"x{report['perf']['kv_cache_speedup']:.1f}; in {args.out_dir}: {files}"
    )


def finish(raw, fs, held, counts, meta, perf, args, rt, step, t_start, writer=None):
    """Final evaluation (rank 0): metrics.json, samples, plots, the summary line."""
    results, curves, videos = evaluate(raw, fs, held, counts, meta, args, rt)
    report = write_metrics(results, perf, args, step, t_start)
    save_samples(videos, args, step, writer)
    save_plots(curves, args)
    if writer:
        ev = report["eval"]
        log_scalars(writer, "eval", ev["likelihood"] | ev["prediction"], step)
        log_scalars(writer, "perf", results["sampling"], step)
    return report


# ---------------------------------------------------------------------------------------- training
SAMPLING_FLAGS = (  # change only evaluation and sampling: free to differ on resume
    "temperature top_k samples bench_samples eval_clips context vqvae"
).split()


def check_args(args):
    """Stop with one line on bad flags, before anything is written. -> the checkpoint path"""
    counts = ["steps", "batch_size", "train_clips", "eval_clips", "samples", "bench_samples"]
    counts += ["frames", "context", "width", "heads", "layers"]
    check_counts(args, counts + ["log_every", "eval_every", "sample_every", "ckpt_every"])
    if args.width % 3 or args.width % args.heads:
        raise SystemExit(
            f"error: --width {args.width} must be divisible by 3 (the position code is three "
            f"tables of width/3) and by --heads {args.heads}; use e.g. --width 144 --heads 4"
        )
    if args.temperature <= 0 or args.top_k < 0:
        raise SystemExit(
            f"error: need --temperature > 0 and --top-k >= 0 (0: all codes), got "
            f"{args.temperature} and {args.top_k}"
        )
    if args.data not in toy_data.KINDS:
        raise SystemExit(
            f"error: unknown data kind {args.data!r}; use one of {', '.join(toy_data.KINDS)}"
        )
    if args.data in ("folder", "npz") and not args.data_dir:
        raise SystemExit(f"error: --data {args.data} needs --data-dir (a folder or an .npz file)")
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


def load_model(args, meta, fs, fs_id, ckpt_path, from_ckpt, rt):
    """The prior for these flags and this first stage, with the weights of ckpt_path when from_ckpt
    and it exists. -> (model, arch, checkpoint or None)"""
    sizes = ("width", "heads", "layers", "dropout", "attn_dropout")
    arch = {"grid": list(meta["latent_shape"][1:]), **{k: getattr(args, k) for k in sizes}}
    arch["first_stage"] = fs_id
    ckpt = None
    if from_ckpt and os.path.isfile(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, arch)
    raw = VideoGPT(fs[2], arch["grid"], *(getattr(args, k) for k in sizes)).to(rt.device)
    if ckpt:
        load_weights(raw, ckpt["model"], ckpt_path)
    return raw, arch, ckpt


def held_out(args, fs):
    """The 'test' clips of the final figures and as many 'val' clips (periodic evaluation, real
    reference of fd_probe), each with its code grids. -> {split: (uint8 clips, codes)}"""
    held = {}
    for split in ("test", "val"):
        clips = load_clips(args, args.eval_clips, split)
        held[split] = (clips, encode_codes(fs, clips))
    return held


def training_codes(args, fs, rt):
    """This rank's training clips, generated and encoded once -> code grids (N, n_tokens)."""
    clips = load_clips(args, args.train_clips, "train", rt.rank, rt.world)
    return encode_codes(fs, clips, what="encoding train clips" if rt.master else None)


def training_state(raw, ckpt, args, rt):
    """Adam, the fp16 loss scaler and this rank's batch generator; restored from ckpt, together
    with every RNG. -> (optimizer, scaler, generator)"""
    gen = torch.Generator().manual_seed(args.seed + 1000 * rt.rank)
    opt = torch.optim.Adam(raw.parameters(), lr=args.lr, fused=rt.device.type == "cuda")
    scaler = make_scaler(rt)
    if ckpt:
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        data_state = set_rng_state(ckpt["rng"], rt.rank)
        if data_state is not None:
            gen.set_state(data_state)
    return opt, scaler, gen


def step_flops(raw, codes, args, rt):
    """FLOPs of one training step (forward and backward of gpt_loss), for GFLOP/s and MFU."""
    batch = codes[: args.batch_size].to(rt.device)
    flops = count_flops(lambda: gpt_loss(raw, batch, rt.amp)[0].backward())
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
    ckpt_path = check_args(args)  # before anything is written
    fs, meta, fs_id = load_first_stage(args.vqvae, args)  # (encode, decode, codebook)
    raw, arch, ckpt = load_model(
        args, meta, fs, fs_id, ckpt_path, args.resume or args.eval_only, rt
    )
    if ckpt and not args.eval_only:  # before any data is made: a refused resume fails fast
        check_resume(ckpt, args, ckpt_path, free=SAMPLING_FLAGS)
    step = ckpt["step"] if ckpt else 0
    probe = metrics.default_probe_path()
    if rt.master and not os.path.isfile(probe):
        print(  # say so now, not after the run
            f"warning: no probe at {probe}, so fd_probe will be None; run `python train_probe.py`",
            flush=True,
        )
    held = held_out(args, fs) if rt.master else None
    n_params = sum(p.numel() for p in raw.parameters())
    if args.eval_only:
        if rt.master:
            for sub in ("samples", "plots"):
                os.makedirs(os.path.join(args.out_dir, sub), exist_ok=True)
            perf = {"train_samples_per_s": None, "mfu": None, "params": n_params}
            report = finish(raw, fs, held, ckpt["unigram"], meta, perf, args, rt, step, time.time())
            print(summary(report, args, trained=False))
        teardown(rt)
        return

    # ---- training state
    codes = training_codes(args, fs, rt)  # (clips, n_tokens) of this rank
    counts = unigram_counts(codes, len(fs[2]), rt)
    opt, scaler, gen = training_state(raw, ckpt, args, rt)
    flops = step_flops(raw, codes, args, rt)  # counted once
    model = wrap_ddp(torch.compile(raw) if rt.compile else raw, rt)
    state = {"model": raw, "optimizer": opt, "scaler": scaler, "unigram": counts}
    ckpt_file = os.path.join(args.out_dir, "ckpt.pt")
    writer = None  # TensorBoard, rank 0 only
    grid = arch["grid"]
    if rt.master:
        writer = open_writer(args, step)
        print(
            f"train_videogpt: {n_params / 1e6:.2f}M params, {rt.device.type} {rt.dtype}, compile "
            f"{rt.compile}, world {rt.world}, {len(codes)} training clips/rank of {args.data} as "
            f"{'x'.join(map(str, grid))} codes of {len(fs[2])}, from step {step} to {args.steps}; "
            f"outputs in {args.out_dir}",
            flush=True,
        )

    # ---- the loop
    meter = LossMeter(["loss"], rt.device)
    speed = SpeedMeter(step, peak_flops(rt))
    t_start = time.time()
    with Control(rt) as control:
        while step < args.steps:
            lr = lr_at(step, args.steps, args.lr, args.warmup_steps)
            set_lr([opt], lr)
            batch = codes[torch.randint(len(codes), (args.batch_size,), generator=gen)]
            loss, _ = gpt_loss(model, batch.to(rt.device), rt.amp)
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
                val_bits(raw, held, counts, rt, step, writer)
            if rt.master and more and step % args.sample_every == 0:
                videos = demo_samples(raw, fs, held, args, grid, rt.amp)
                save_samples(videos, args, step, writer)
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
        val_bits(raw, held, counts, rt, step, writer)
        speeds = speed.summary(args.batch_size * rt.world)
        perf = {**speeds, "params": n_params, "device": device_name(rt), "dtype": rt.dtype}
        report = finish(raw, fs, held, counts, meta, perf, args, rt, step, t_start, writer)
        writer.close()
        curves_png = os.path.join(args.out_dir, "plots", "training_curves.png")
        viz.plot_training_curves(args.out_dir, curves_png)
        print(summary(report, args, trained=True))
    teardown(rt)


if __name__ == "__main__":
    run(main, tyro.cli(Args))
