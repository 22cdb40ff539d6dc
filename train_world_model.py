"""Latent world model: encoder -> GRU / LSTM / transformer dynamics -> decoder, rolled out on its
own predictions.

Each frame (64x64) is encoded to a small latent grid (default 4 x 8 x 8 = 256 numbers; --latent-grid
16 keeps 4 x 16 x 16): a grid, not a pooled vector, so the latent keeps where things are. The
dynamics model reads the latents of the --context observed frames one by one, then predicts each
next latent from its own previous prediction (never from the encoded truth), --horizon times in
training and --rollout times at evaluation, which may go past the training horizon. The decoder
turns latents back into frames. All three train together on pixel losses: reconstruction of the
context frames (autoencoding) and of the predicted frames, an image-gradient-difference term for
sharpness, and a temporal term that matches predicted frame differences to the true ones.

Dynamics (--dynamics): `gru` and `lstm` are convolutional recurrent cells over the latent grid;
`transformer` is a causal transformer over the latent cells of the last --context frames, with a KV
cache and ALiBi biases on frame distance instead of time positions, so a rollout can run to any
length.

Encoders (--encoder): `conv` trains with the rest. The seed's pretrained encoders are frozen unless
--finetune-encoder, and a small trained adapter (1x1 projection, residual block, conv head) maps
their features to the latent grid; the decoder always trains. `vqvae:DIR`: the exported encoder of
a train_vqvae.py first stage (frames at its resolution, which must be --resolution; its latent
grid, resolution / 8; z_e normalised by its training statistics). `resnet18`: torchvision's, up to
layer2 (stride 8), on frames resized to 8 x the grid (at the default grid, as they are). `dinov2`:
ViT-S/14's last-layer patch features on frames resized to 14 x the grid (112 px for 8x8). Both get
grey frames as RGB, normalised with ImageNet's mean and std. Pretrained networks always run in
inference mode (BatchNorm keeps its statistics). Weights come from local files only
(--encoder-weights, torch.hub's cache; the README says how to fetch them); checkpoints hold them,
so resume and --eval-only need no weights file.

Papers: NVIDIA, "Cosmos World Foundation Model Platform for Physical AI" (2025) and the public
Cosmos-inspired seed project (chenli-git/cosmo_video_world_model), of which three flaws are fixed
here: spatial latents instead of a globally pooled vector, a temporal loss that matches true motion
instead of penalising all motion, and evaluation in the regime of training (latent rollout on own
predictions). Shi et al., ConvLSTM (2015); Ballas et al., ConvGRU (2016); Mathieu et al., gradient
difference loss (2016); Press et al., ALiBi (2022). There is no VGG perceptual loss: it needs
downloaded ImageNet weights. Training ramps the rollout length from 1 to --horizon over the first
--curriculum fraction of the steps: long rollouts learn slowly while the autoencoder is still
blurry.

    python train_world_model.py                       # CPU: ~9 min on 2 cores, bouncing balls
    python train_world_model.py --data moving_mnist   # any toy_data kind
    # your .gif/.mp4/... files or frame folders:
    python train_world_model.py --data folder --data-dir my_videos/
    python train_world_model.py --dynamics transformer               # or lstm
    # GPU:
    python train_world_model.py --width 32 --hidden 128 --batch-size 64 --steps 20000 --decoder-attn
    torchrun --standalone --nproc_per_node=2 train_world_model.py  # DDP (nccl on CUDA, gloo on CPU)
    python train_world_model.py --eval-only --ckpt runs/train_world_model/ckpt_best.pt --rollout 60
    # pretrained encoders: a first stage of the same data, torchvision's ResNet-18, DINOv2
    python train_vqvae.py --data bouncing_balls --out-dir runs/train_vqvae_balls
    python train_world_model.py --encoder vqvae:runs/train_vqvae_balls
    python train_world_model.py --encoder resnet18 --encoder-weights resnet18-f37072fd.pth
    python train_world_model.py --encoder dinov2 --finetune-encoder   # torch.hub's local copy
    # a CPU shared with other jobs: far faster than 2 threads
    OMP_NUM_THREADS=1 python train_world_model.py

Actions (--actions): a world model you steer. Each dynamics step also takes the action taken
after the frame it reads (actions[t] moves frame t to frame t + 1), as a learned embedding (an
nn.Embedding with a spare null row for unknown actions, -1) added to every cell of the ConvGRU's
or ConvLSTM's input and to every token of the transformer's frame. --action-dropout of the
training clips get null actions only, so the same model also predicts without them (the
actions_zeroed baseline). On --data agent (toy_data: a yellow agent that walks and pushes red
balls in a walled room) metrics.json adds the agent's position error in cells, read from
predicted frames against the simulator's under the same actions, per frame out to --rollout, the
share of cells a pushed ball moved into that show a ball (and of those it left that show none),
and a counterfactual test: the same context continued with each of up, down, left, right, in the
model and in the simulator (samples/counterfactual.png). --play opens a matplotlib window (arrows
or WASD, space waits, r resets, q quits; one model step per key press) beside the simulator;
--play-actions RRUUL... plays the letters headless into samples/play.gif and play.png and prints
frames/s. Your own videos with actions: docs/data.md (<stem>.actions.txt beside each video).
These flags make a game of few states per cell hold up over long play: --fsq-levels quantises
the latent grid (Mentzer et al., FSQ, 2023), so small errors are undone at every step;
--input-kernel 5 lets a cell see two cells away (behind the ball the agent pushes);
--rollout-window 1 rebuilds the recurrent state at every step after the first from the last
latent alone (a window of frames, as DIAMOND and GameNGen condition on), in training and play
alike, so a 60-step game runs the computation training ran. At evaluation and in play,
--reencode feeds each predicted frame back (decoded, then encoded again) instead of its latent:
what the frame does not show cannot come back later, and pushed balls stay where they went.
--fresh trains on new clips every step (the simulator is cheap) instead of a fixed pool.

    AGENT="--data agent --actions --resolution 32 --latent-grid 8 --context 4 --fsq-levels 5
        --input-kernel 5 --rollout-window 1 --reencode"
    OMP_NUM_THREADS=1 python train_world_model.py $AGENT --fresh --steps 4500  # 13 min, 1 thread
    python train_world_model.py $AGENT --ckpt runs/train_world_model/ckpt_best.pt --play
    # or --play-actions RRUUL (headless)

The Moving MNIST 10 -> 10 benchmark (docs/results/moving_mnist.md): fresh two-digit clips every
step, evaluated on a file in the standard test layout (mnist_test_seq.npy, or the one toy_data.py
writes with held-out digits); metrics.json and the last line give the per-frame MSE and MAE (sums
over a frame's pixels), PSNR, SSIM in our convention and in the published tables' (ssim_openstl),
and copy_last on the same clips:

    python toy_data.py --kind moving_mnist --split test --num 10000 --frames 20 \
        --out mnist_test_seq.npy
    MMNIST="--data moving_mnist --fresh --frames 20 --context 10 --horizon 10 --rollout 10
        --latent-grid 16 --batch-size 16 --test-file mnist_test_seq.npy"
    OMP_NUM_THREADS=1 python train_world_model.py $MMNIST --steps 500 --test-clips 2000  # CPU
    python train_world_model.py $MMNIST --width 64 --hidden 128 --steps 125000 \
        --eval-every 625 --ckpt-every 625 --sample-every 6250 --test-clips 10000         # GPU

Model selection on val, figures on test: the evaluation every --eval-every steps runs on val clips
and keeps the best weights in ckpt_best.pt; metrics.json holds those weights' figures on test
clips (split 'test' of --data, or --test-file).

Outputs in --out-dir: ckpt.pt, ckpt_best.pt (the weights with the lowest validation loss),
args.json, metrics.json (ckpt_best.pt's weights and the copy_last baseline on the same test clips),
TensorBoard
events (train/ eval/ perf/ samples/), samples/ (rollout_*.gif: truth | prediction | error with the
context boundary marked; rollout_latest.png: frames with per-frame MSE), plots/
(horizon_{psnr,ssim,mse}.png, training_curves.png).
"""

import glob
import json
import math
import os
import random
import shlex
import signal
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
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
    steps: int = 1000
    """training steps (one batch per process each)"""
    seed: int = 0
    """random seed: model init, data sets and batch order"""
    out_dir: str = "runs/train_world_model"
    """folder for ckpt.pt, ckpt_best.pt, metrics.json, TensorBoard events, samples/ and plots/"""
    resume: bool = True
    """continue from --ckpt (default out_dir/ckpt.pt) when it exists"""
    eval_only: bool = False
    """evaluate the checkpoint, write metrics.json, samples and plots, then exit"""
    ckpt: str | None = None
    """checkpoint to resume or evaluate (default: out_dir/ckpt.pt)"""
    accept_changed_args: bool = False
    """resume even if flags that shape the run (steps, lr, batch size, data, ...) differ from the
    checkpoint's (the schedule then changes mid-run)"""
    log_every: int = 50
    """print and log training losses every N steps"""
    eval_every: int = 250
    """held-out evaluation every N steps (and always at the end); keeps ckpt_best.pt"""
    sample_every: int = 500
    """write rollout GIFs every N steps"""
    ckpt_every: int = 250
    """write ckpt.pt every N steps (and at the end and on Ctrl-C)"""
    # system
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto: CUDA if present, else CPU"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """autocast dtype; auto: bf16 on CUDA and bf16-capable CPUs, fp16 + GradScaler on older GPUs,
    else fp32"""
    compile: tyro.conf.DisallowNone[bool | None] = None
    """torch.compile the model (default: on for CUDA, off otherwise)"""
    # data
    data: str = "bouncing_balls"
    """data kind: shapes, bouncing_balls, pendulum, falling, projectile, moving_mnist, smoke, agent
    (with actions), folder or npz (the last two need --data-dir)"""
    data_dir: str | None = None
    """folder of videos (--data folder), .npz file (--data npz) or MNIST files (--data
    moving_mnist); implies its kind when --data is left out"""
    resolution: int = 64
    """frame size in pixels (divisible by 8)"""
    frames: int = 32
    """frames per training clip; batches cut random windows of --context + --horizon frames from
    them"""
    context: int = 10
    """observed frames before the prediction starts (also the transformer's attention window)"""
    horizon: int = 10
    """frames predicted in training; the headline metrics average this many predicted frames"""
    rollout: int | None = None
    """frames predicted at evaluation and in the demo (default: 3 x --horizon, past the training
    horizon)"""
    rollout_window: int = 0
    """rebuild the recurrent state at every rollout step after the first from the last N latents
    (a sliding window of frames; at most --context), in training, evaluation and play alike, so a
    game of any length runs the computation training ran (a step costs N dynamics steps); 0
    carries the state throughout. 1 makes each step a function of the last frame and action alone,
    which suits a game whose frame tells everything (--data agent)"""
    reencode: bool = False
    """at evaluation and in play, feed each predicted frame back instead of its latent: every
    predicted latent is decoded, clamped to [0, 1] and encoded again before the next step reads
    it, so nothing the frame does not show carries over (a ball shown gone cannot come back from
    a trace in the latent). Training rolls out on latents either way: trained through the
    re-encoded frames, the agent preset lost its agent"""
    train_clips: int = 512
    """clips generated once into memory as the training pool (split 'train')"""
    fresh: bool = False
    """draw new clips for every batch instead of the --train-clips pool (clip indices of split
    'train' never repeat; generated kinds only)"""
    eval_clips: int = 64
    """val clips (split 'val') of --context + --rollout frames: the evaluation during training,
    which picks ckpt_best.pt"""
    test_clips: int = 64
    """test clips of --context + --rollout frames behind metrics.json (split 'test' of --data, or
    the first N of --test-file)"""
    test_file: str | None = None
    """a file of test clips for metrics.json instead of split 'test' of --data: an .npz, or the
    standard time-first layout (20, N, 64, 64) of mnist_test_seq.npy"""
    # model
    width: int = 16
    """channels of encoder and decoder at 1/2 resolution; doubled twice on the way down to the
    latent grid"""
    latent_channels: int = 4
    """channels of the latent grid (4 x 8 x 8 = 256 numbers at 64x64)"""
    latent_grid: int | None = None
    """side of the latent grid: --resolution / 2, / 4 or / 8 (default: / 8, 8x8 at 64 px)"""
    dynamics: str = "gru"
    """dynamics model: gru (ConvGRU), lstm (ConvLSTM) or transformer (causal, over latent cells)"""
    hidden: int = 64
    """channels of the recurrent state / width of the transformer"""
    layers: int = 2
    """transformer layers"""
    heads: int = 4
    """transformer attention heads"""
    decoder_attn: bool = False
    """self-attention in the decoder at the 8x8 and 16x16 scales (the seed's 'enhanced decoder')"""
    encoder: str = "conv"
    """frame encoder: conv (trained with the rest), vqvae:DIR (the frozen encoder of a first stage
    written by train_vqvae.py at --resolution), resnet18 (torchvision, ImageNet weights) or dinov2
    (ViT-S/14); a small trained adapter maps a pretrained encoder's features to the latent grid"""
    encoder_weights: str | None = None
    """resnet18: a state-dict file (default: torchvision's cache file
    checkpoints/resnet18-f37072fd.pth in torch's hub folder, ~/.cache/torch/hub or
    $TORCH_HOME/hub); dinov2: a TorchScript file or a local torch.hub folder of
    facebookresearch/dinov2 (default: facebookresearch_dinov2_main in the hub folder, with the
    weights checkpoints/dinov2_vits14_pretrain.pth there). Nothing is ever downloaded"""
    finetune_encoder: bool = False
    """train the weights of --encoder resnet18 or dinov2 too (frozen by default)"""
    # optim
    batch_size: int = 8
    """clips per batch per process"""
    lr: float = 2e-3
    """peak learning rate (AdamW), after linear warm-up, cosine-decayed to lr/10"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    warmup_steps: int = 50
    """linear learning-rate warm-up steps"""
    grad_clip: float = 1.0
    """clip the gradient norm to this (0: off)"""
    # method
    recon_loss: Literal["mse", "l1", "mse+l1"] = "mse"
    """pixel loss of reconstructed and predicted frames on [0, 1]"""
    gdl_weight: float = 0.1
    """weight of the gradient difference loss (image gradients of prediction vs truth: sharpness)"""
    temporal_weight: float = 0.5
    """weight of the temporal loss (predicted frame differences vs true frame differences)"""
    curriculum: float = 0.3
    """fraction of --steps over which the training rollout grows from 1 frame to --horizon (0: full
    from the start)"""
    # actions
    actions: bool = False
    """condition the dynamics on the action of each frame (--data agent, or a folder whose videos
    have <stem>.actions.txt files): actions[t], taken after frame t, enters the step that predicts
    frame t + 1"""
    action_dropout: float = 0.1
    """with --actions: fraction of training clips whose actions are replaced by the null (unknown)
    action, so the model also predicts without them (the actions_zeroed baseline)"""
    input_kernel: int = 3
    """kernel of the ConvGRU's or ConvLSTM's input convolution over the latent grid (odd): how far
    a cell sees in the frame it reads. 5 lets the agent's cell (--data agent) see past a ball it
    walks into, where a wall or a ball decides whether the push happens"""
    fsq_levels: int = 0
    """quantise the latent grid, at encoding and after every dynamics step, to this many levels
    per channel (odd, e.g. 5; 0: continuous): an error under half a level is undone at the next
    step, so a world of few states per cell (--data agent) stays sharp in long rollouts"""
    play: bool = False
    """play the checkpoint (--ckpt, default out_dir/ckpt.pt) in a window: arrows or WASD move, space
    waits, r resets, q quits; one model step per key press, the simulator beside it"""
    play_actions: str | None = None
    """headless play: one letter per step, U D L R or N (none), e.g. RRRUUL; writes
    out_dir/samples/play.gif (model | simulator | difference) and prints frames/s"""


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


def zero_init(layer):
    """An output layer that starts at 0: the dynamics begin as 'nothing moves' (the copy_last
    baseline)."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class ConvGRU(nn.Module):
    """Convolutional GRU over the latent grid (3x3 kernels: a cell sees its neighbours, i.e. +-8
    pixels a step; the input convolution's kernel may be wider, --input-kernel)."""

    def __init__(self, zc, hidden, input_kernel=3):
        super().__init__()
        self.inp = nn.Conv2d(zc, hidden, input_kernel, padding=input_kernel // 2)
        self.gates = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1)
        self.cand = nn.Conv2d(2 * hidden, hidden, 3, padding=1)
        self.out = zero_init(nn.Conv2d(hidden, zc, 3, padding=1))

    def forward(self, z, h=None, a=None):
        """latent z (B, zc, h, w), state, action embedding (B, hidden) or None -> next latent,
        state. The action is added to the input at every cell: a broadcast bias the gates read."""
        x = F.silu(self.inp(z))
        if a is not None:
            x = x + a[:, :, None, None]
        h = torch.zeros_like(x) if h is None else h
        r, u = torch.sigmoid(self.gates(torch.cat([x, h], 1))).chunk(2, 1)
        h = u * h + (1 - u) * torch.tanh(self.cand(torch.cat([x, r * h], 1)))
        return z + self.out(h), h


class ConvLSTM(nn.Module):
    """Convolutional LSTM over the latent grid (Shi et al. 2015, without peepholes)."""

    def __init__(self, zc, hidden, input_kernel=3):
        super().__init__()
        self.inp = nn.Conv2d(zc, hidden, input_kernel, padding=input_kernel // 2)
        self.gates = nn.Conv2d(2 * hidden, 4 * hidden, 3, padding=1)
        self.out = zero_init(nn.Conv2d(hidden, zc, 3, padding=1))

    def forward(self, z, state=None, a=None):
        x = F.silu(self.inp(z))
        if a is not None:  # as in ConvGRU
            x = x + a[:, :, None, None]
        h, c = (torch.zeros_like(x), torch.zeros_like(x)) if state is None else state
        i, f, o, g = self.gates(torch.cat([x, h], 1)).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return z + self.out(h), (h, c)


class Block(nn.Module):
    """Pre-norm transformer block whose attention reads a frame's own cells and the cached cells of
    earlier frames."""

    def __init__(self, d, heads, grid):
        super().__init__()
        self.heads = heads
        sq = torch.arange(1 - grid, grid) ** 2
        # squared offset (dy, dx) between a query and a key cell
        near = (sq[:, None] + sq[None]).flatten().float()
        # a learned bias per offset; starts local, as a conv would
        self.space = nn.Parameter(-near.repeat(heads, 1))
        self.n1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.n2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, cache, slopes, window, offset):
        B, N, D = x.shape
        qkv = self.qkv(self.n1(x)).view(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        # a new list: states stay immutable, so a rollout can be branched
        cache = (cache + [(k, v)])[-window:]
        keys = torch.cat([c[0] for c in cache], 2)
        values = torch.cat([c[1] for c in cache], 2)
        # frames back, per key
        age = torch.arange(len(cache) - 1, -1, -1, device=x.device).repeat_interleave(N)
        # ALiBi: depends on distance only, so any length works
        bias = -slopes.view(-1, 1, 1) * age.to(slopes.dtype)
        # where a cell looks: "one cell to the left"
        bias = bias + self.space[:, offset].repeat(1, 1, len(cache))
        h = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias.to(q.dtype))
        x = x + self.proj(h.transpose(1, 2).reshape(B, N, D))
        return x + self.mlp(self.n2(x)), cache


class CausalTransformer(nn.Module):
    """Causal transformer over latent cells: each step takes one frame's h*w cells as tokens; they
    attend to each other and to the keys/values cached for the last `window` frames. With ALiBi on
    frame distance and a learned position per grid cell (space, not time), the same weights serve
    step 1 and step 1000. A learned bias per spatial offset (as in Swin) and 3x3 convolutions in and
    out make "move one cell" easy to express."""

    def __init__(self, zc, d, layers, heads, grid, window):
        super().__init__()
        self.window = window
        self.inp = nn.Conv2d(zc, d, 3, padding=1)
        self.pos = nn.Parameter(0.02 * torch.randn(1, grid * grid, d))
        self.blocks = nn.ModuleList(Block(d, heads, grid) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.out = zero_init(nn.Conv2d(d, zc, 3, padding=1))
        slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)
        self.register_buffer("slopes", slopes, persistent=False)
        y, x = torch.arange(grid).repeat_interleave(grid), torch.arange(grid).repeat(grid)
        offset = (y[:, None] - y[None] + grid - 1) * (2 * grid - 1) + (
            x[:, None] - x[None] + grid - 1
        )
        # (query cell, key cell) -> index of (dy, dx)
        self.register_buffer("offset", offset, persistent=False)

    def forward(self, z, caches=None, a=None):
        B, C, H, W = z.shape
        x = self.inp(z).flatten(2).transpose(1, 2) + self.pos
        if a is not None:  # the action embedding joins every token of the frame
            x = x + a[:, None, :]
        caches = caches or [[] for _ in self.blocks]
        new = []
        for block, cache in zip(self.blocks, caches):
            x, cache = block(x, cache, self.slopes, self.window, self.offset)
            new.append(cache)
        return z + self.out(self.norm(x).transpose(1, 2).reshape(B, -1, H, W)), new


DYNAMICS = ("gru", "lstm", "transformer")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """A pretrained feature extractor: frames (B, C, H, W) in [0, 1] -> features (B, channels, g, g)
    on the latent grid. Frames are resized to `size` (the network's stride x g); ImageNet networks
    get grey frames as RGB, normalised with ImageNet's mean and std; tokens (B, g * g, channels) are
    laid out on the grid; shift and scale normalise the features (a first stage's latent
    statistics). The network always runs as in inference: BatchNorm keeps its pretrained
    statistics, and exported programs cannot switch mode. Frozen, it builds no graph."""

    def __init__(self, net, channels, size, imagenet, shift=0.0, scale=1.0, trainable=False):
        super().__init__()
        self.net = net
        for p in net.parameters():  # a TorchScript module has no requires_grad_()
            p.requires_grad_(trainable)
        self.channels = channels
        self.size = size
        self.imagenet = imagenet
        self.trainable = trainable
        self.training = False
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        for name, value in (("shift", shift), ("scale", scale)):
            value = torch.as_tensor(value, dtype=torch.float32).reshape(1, -1, 1, 1)
            self.register_buffer(name, value.expand(1, channels, 1, 1).clone())

    def train(self, mode=True):
        return self  # see the class docstring: the network's mode never changes

    def forward(self, x):
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        if self.imagenet:  # grey frames broadcast to RGB
            x = (x - self.mean) / self.std
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            f = self.net(x)
        if f.dim() == 3:  # tokens, row by row
            g = math.isqrt(f.shape[1])
            f = f.transpose(1, 2).unflatten(2, (g, g))
        return (f.float() - self.shift) / self.scale


class DinoPatches(nn.Module):
    """DINOv2's patch features of the last layer, normalised, as a map (B, 384, h, w)."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit.get_intermediate_layers(x, n=1, reshape=True, norm=True)[0]


def adapter(cin, c, latent_channels):
    """The trained map from a pretrained encoder's features to the latent grid: a 1x1 projection,
    a residual block and the conv encoder's head."""
    return nn.Sequential(
        nn.Conv2d(cin, c, 1),
        ResBlock(c, c),
        norm(c),
        nn.SiLU(),
        nn.Conv2d(c, latent_channels, 3, padding=1),
    )


def make_dynamics(kind, zc, hidden, layers, heads, grid, window, input_kernel=3):
    """The dynamics model of --dynamics on latents of zc channels."""
    if kind == "gru":
        return ConvGRU(zc, hidden, input_kernel)
    if kind == "lstm":
        return ConvLSTM(zc, hidden, input_kernel)
    return CausalTransformer(zc, hidden, layers, heads, grid, window)


def conv_encoder(channels, width, latent_channels, down):
    """Frames -> latent grid: a strided stem (full-resolution layers are what costs most on a
    CPU), then blocks that halve the size until `down` halvings (1-3) reach the latent grid."""
    c1, c2, c3 = width, 2 * width, 4 * width
    return nn.Sequential(
        nn.Conv2d(channels, c1, 4, stride=2, padding=1),
        ResBlock(c1, c2, "down" if down > 1 else None),
        ResBlock(c2, c3, "down" if down > 2 else None),
        ResBlock(c3, c3),
        norm(c3),
        nn.SiLU(),
        nn.Conv2d(c3, latent_channels, 3, padding=1),
    )


def conv_decoder(channels, width, latent_channels, down, decoder_attn):
    """Latent grid -> frames, the encoder mirrored; pixel shuffle for the last doubling: sharp
    edges at 1/2 resolution's cost."""
    c1, c2, c3 = width, 2 * width, 4 * width
    attn = SelfAttention if decoder_attn else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(latent_channels, c3, 3, padding=1),
        ResBlock(c3, c3),
        attn(c3),
        ResBlock(c3, c2, "up" if down > 2 else None),
        attn(c2),
        ResBlock(c2, c1, "up" if down > 1 else None),
        norm(c1),
        nn.SiLU(),
        nn.Conv2d(c1, 4 * channels, 3, padding=1),
        nn.PixelShuffle(2),
    )


class WorldModel(nn.Module):
    def __init__(
        self,
        channels=3,
        width=16,
        latent_channels=4,
        dynamics="gru",
        hidden=64,
        layers=2,
        heads=4,
        decoder_attn=False,
        grid=8,
        window=10,
        down=3,
        encoder="conv",
        backbone=None,
        num_actions=0,
        action_names=(),
        fsq_levels=0,
        input_kernel=3,
    ):
        """encoder: conv, or the name of the pretrained `backbone` (a Backbone on the latent
        grid), which an adapter follows. num_actions > 0: the dynamics take an action per step,
        embedded by a table with one spare row, the null (unknown) action, for ids < 0."""
        super().__init__()
        self.backbone = backbone
        if encoder == "conv":
            self.encoder = conv_encoder(channels, width, latent_channels, down)
        else:
            self.encoder = adapter(backbone.channels, 4 * width, latent_channels)
        self.decoder = conv_decoder(channels, width, latent_channels, down, decoder_attn)
        self.dynamics = make_dynamics(
            dynamics, latent_channels, hidden, layers, heads, grid, window, input_kernel
        )
        self.num_actions = num_actions
        self.action_names = list(action_names)
        self.fsq_levels = fsq_levels
        if num_actions:
            self.action_embed = nn.Embedding(num_actions + 1, hidden)

    def quantise(self, z):
        """Finite scalar quantisation (Mentzer et al. 2023) with --fsq-levels L (odd): each
        channel bounded to (-L//2, L//2) by a scaled tanh and rounded to an integer, with a
        straight-through gradient. Identity when L = 0."""
        if not self.fsq_levels:
            return z
        h = self.fsq_levels // 2
        z = h * torch.tanh(z / h)
        return z + (z.round() - z).detach()

    def step(self, z, state, action=None):
        """One dynamics step: latent z (B, ...) and the action ids (B,) taken after its frame
        (< 0: unknown) -> the next frame's latent (quantised), state."""
        if action is None:
            z, state = self.dynamics(z, state)
        else:
            ids = torch.where(action < 0, self.num_actions, action)
            z, state = self.dynamics(z, state, self.action_embed(ids))
        return self.quantise(z), state

    def encode(self, x):
        """x (B, C, H, W) in [0, 1] -> latent grid (B, latent_channels, H/2^down, W/2^down)."""
        if self.backbone is None:
            return self.quantise(self.encoder(x * 2 - 1))
        return self.quantise(self.encoder(self.backbone(x)))

    def decode(self, z):
        """latent grid -> frames (unclamped; about [0, 1])."""
        return (self.decoder(z) + 1) / 2

    def window_step(self, latents, actions):
        """The next latent from a zero state that reads the given latents (a list of (B, ...))
        with their actions (a list of ids (B,) or Nones), the last action moving the last latent."""
        state = None
        for z, a in zip(latents, actions):
            # contiguous: the strides of a predicted latent, so a compiled cell needs one graph
            z, state = self.step(z.contiguous(), state, a)
        return z

    def reencoded(self, z):
        """The latent of z's decoded frame (clamped to [0, 1]): what --reencode feeds back."""
        return self.encode(self.decode(z).clamp(0, 1))

    def rollout(self, z_context, steps, actions=None, window=0, reencode=False):
        """Latents of the observed frames (B, T, ...) -> `steps` predicted latents (B, steps, ...).
        The context is read one frame at a time; after it, every step's input is the previous step's
        prediction. actions (B, >= T + steps - 1) ids: actions[:, t] moves frame t to t + 1.
        window > 0 (at most T): every step after the first rebuilds the state from zero over the
        last `window` latents (a sliding window of frames, as in DIAMOND and GameNGen), so a
        rollout of any length repeats one computation; 0 carries the state throughout.
        reencode: each prediction is replaced by reencoded(prediction), the latent of its frame."""
        at = (lambda t: None) if actions is None else (lambda t: actions[:, t])
        T = z_context.shape[1]
        zs = [*z_context.unbind(1)]
        acts = [at(t) for t in range(T - 1)]
        state = None
        for t in range(T - 1):
            _, state = self.step(zs[t].contiguous(), state, acts[t])
        for t in range(T - 1, T + steps - 1):  # t: the frame of the newest latent
            acts.append(at(t))
            z, state = self.next_latent(zs, acts, state, window, t == T - 1, reencode)
            zs.append(z)
        return torch.stack(zs[T:], 1)

    def next_latent(self, latents, actions, state, window, first, reencode):
        """The step rule past the observed frames, for rollout() and play: the first prediction
        carries the state read over them; later ones, with window > 0, rebuild it from zero over the
        last `window` latents and their actions (lists, newest last), else carry it on. reencode:
        the latent of the predicted frame is fed back. -> (latent, state)"""
        if window and not first:
            z = self.window_step(latents[-window:], actions[-window:])
        else:
            z, state = self.step(latents[-1].contiguous(), state, actions[-1])
        return (self.reencoded(z) if reencode else z), state

    def forward(self, context, steps, actions=None, window=0, reencode=False):
        """context frames (B, T, C, H, W) -> their reconstructions (B, T, ...), `steps` predicted
        frames (B, steps, ...) and the predicted latents (rollout's window). Nothing after the
        context is seen but the actions (B, >= T + steps - 1), if the model takes them. window,
        reencode: rollout()'s."""
        B, T = context.shape[:2]
        z = self.encode(context.flatten(0, 1)).unflatten(0, (B, T))
        z_pred = self.rollout(z, steps, actions, window, reencode)
        frames = self.decode(torch.cat([z, z_pred], 1).flatten(0, 1)).unflatten(0, (B, T + steps))
        return frames[:, :T], frames[:, T:], z_pred


# ----------------------------------------------------------------------------- method
def gradient_difference_loss(pred, target):
    """Mathieu et al. 2016 (alpha = 1): |(|dx pred| - |dx target|)| + the same along y. A blurred
    edge has small image gradients where the truth has large ones, so this term pays for sharpness
    that MSE alone does not."""
    loss = 0.0
    for d in (-1, -2):
        gp, gt = pred.diff(dim=d).abs(), target.diff(dim=d).abs()
        loss = loss + (gp - gt).abs().mean()
    return loss


def temporal_loss(pred, target):
    """MSE between predicted and true frame differences along T. Zero whenever the prediction moves
    exactly as the truth does; the seed project's mean |x_{t+1} - x_t| instead penalised all motion
    and pulled toward stills."""
    return F.mse_loss(pred.diff(dim=1), target.diff(dim=1))


PIXEL_LOSSES = {
    "mse": F.mse_loss,
    "l1": F.l1_loss,
    "mse+l1": lambda a, b: F.mse_loss(a, b) + F.l1_loss(a, b),
}
LOSS_NAMES = ["loss", "rec", "pred", "gdl", "temporal"]


def world_model_losses(context, target, rec, pred, kind="mse", gdl_weight=0.1, temporal_weight=0.5):
    """context (B, T, ...), target (B, k, ...): true frames; rec, pred: the model's. Reduced in
    fp32. -> total, stacked [total, reconstruction, prediction, gradient difference, temporal]."""
    rec, pred = rec.float(), pred.float()
    pix = PIXEL_LOSSES[kind]
    l_rec, l_pred = pix(rec, context), pix(pred, target)
    l_gdl = gradient_difference_loss(torch.cat([rec, pred], 1), torch.cat([context, target], 1))
    # the last context frame (reconstructed | true) anchors the first predicted difference
    l_tmp = temporal_loss(
        torch.cat([rec[:, -1:], pred], 1), torch.cat([context[:, -1:], target], 1)
    )
    total = l_rec + l_pred + gdl_weight * l_gdl + temporal_weight * l_tmp
    return total, torch.stack([total, l_rec, l_pred, l_gdl, l_tmp]).detach()


def rollout_losses(model, x, k, args, amp, steps=None, actions=None, reencode=False):
    """THE loss, for training, validation and the FLOP count: encode the --context frames of clips x
    (B, T, C, H, W) in [0, 1], roll out `steps` frames (default k) on the model's own latents
    (with the clips' actions (B, T) under --actions; --rollout-window and `reencode` as rollout()
    takes them), and score the reconstruction and the first k predicted frames against x.
    -> total, stacked terms (LOSS_NAMES), reconstructed frames, predicted frames."""
    c = args.context
    with amp:
        rec, pred, _ = model(x[:, :c], steps or k, actions, args.rollout_window, reencode)
    target = x[:, c : c + k]
    total, terms = world_model_losses(
        x[:, :c], target, rec, pred[:, :k], args.recon_loss, args.gdl_weight, args.temporal_weight
    )
    return total, terms, rec, pred


def rollout_len(step, args):
    """Training rollout length: 1 -> --horizon over the first --curriculum fraction of the steps."""
    ramp = args.curriculum * args.steps
    if ramp <= 0:
        return args.horizon
    return max(1, min(args.horizon, math.ceil(args.horizon * (step + 1) / ramp)))


def eval_rollout(args):
    """Frames predicted at evaluation and in the samples: --rollout, by default 3 x --horizon."""
    return args.rollout or 3 * args.horizon


def train_step(model, opt, scaler, x, k, args, amp, actions=None):
    """One AdamW step on a batch x (and its actions) at rollout length k -> the loss terms
    (LOSS_NAMES)."""
    loss, terms, _, _ = rollout_losses(model, x, k, args, amp, actions=actions)
    optimizer_step(opt, scaler, loss, model.parameters(), args.grad_clip)
    return terms


# ----------------------------------------------------------------------------- pretrained encoders
# torch.hub's file and folder names, where torchvision and torch.hub.load keep what they download
RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's ResNet18_Weights.IMAGENET1K_V1
DINOV2_FILE = "dinov2_vits14_pretrain.pth"
DINOV2_REPO = "facebookresearch_dinov2_main"
ENCODERS = ("conv", "vqvae:DIR", "resnet18", "dinov2")
WEIGHTS_ADVICE = {
    "resnet18": 'on a machine with internet, `python -c "import torchvision; '
    "torchvision.models.resnet18(weights='IMAGENET1K_V1')\"` saves it as "
    f"~/.cache/torch/hub/checkpoints/{RESNET18_FILE}; copy that file to this path or pass "
    "--encoder-weights FILE",
    "dinov2": 'on a machine with internet, `python -c "import torch; '
    "torch.hub.load('facebookresearch/dinov2', 'dinov2_vits14')\"` saves the code in "
    f"~/.cache/torch/hub/{DINOV2_REPO} and the weights in ~/.cache/torch/hub/checkpoints/"
    f"{DINOV2_FILE}; copy both to the same places under this machine's torch hub folder "
    "(TORCH_HOME) or pass --encoder-weights with a TorchScript file",
}


def encoder_kind(spec):
    """--encoder -> conv, vqvae, resnet18 or dinov2 (what a checkpoint records)."""
    kind = spec.split(":", 1)[0] if spec.startswith("vqvae:") else spec
    if kind not in ("conv", "vqvae", "resnet18", "dinov2"):
        raise SystemExit(f"error: unknown --encoder {spec!r}; use one of {', '.join(ENCODERS)}")
    return kind


def check_encoder_flags(args):
    """Stop with one line on encoder flags that cannot apply."""
    kind = encoder_kind(args.encoder)
    if kind == "vqvae" and not args.encoder[len("vqvae:") :]:
        raise SystemExit("error: --encoder vqvae:DIR needs the folder of a train_vqvae.py run")
    if args.encoder_weights and kind not in WEIGHTS_ADVICE:
        raise SystemExit(
            f"error: --encoder-weights applies to --encoder resnet18 or dinov2, not {kind}"
        )
    if args.finetune_encoder and kind == "conv":
        raise SystemExit(
            "error: --finetune-encoder trains a pretrained encoder; the conv encoder always "
            "trains: drop the flag"
        )
    if args.finetune_encoder and kind == "vqvae":
        raise SystemExit(
            "error: --finetune-encoder cannot train --encoder vqvae:DIR: its encoder is an "
            "exported program (frozen); use --encoder conv to train one from scratch"
        )
    if kind == "vqvae" and latent_grid(args) != args.resolution // 8:
        raise SystemExit(
            f"error: --encoder {args.encoder} gives the first stage's latent grid, --resolution "
            f"{args.resolution} / 8; drop --latent-grid {args.latent_grid}"
        )


def read_weights(path, kind, module):
    """Load a state-dict file into module, or stop with one line that says how to get it."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no {kind} weights at {path}; {WEIGHTS_ADVICE[kind]}")
    try:
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:
        raise SystemExit(
            f"error: cannot load {kind} weights from {path} ({type(e).__name__}: "
            f"{first_line(e)}); {WEIGHTS_ADVICE[kind]}"
        )


def feature_channels(net, channels, size, grid, what):
    """Channels of net's features for a frame of `size` px, which must lie on the grid x grid latent
    grid as a map (1, C, grid, grid) or tokens (1, grid * grid, C); else stop with one line."""
    try:
        with torch.no_grad():
            f = net(torch.zeros(1, channels, size, size))
    except Exception as e:
        raise SystemExit(
            f"error: --encoder {what} failed on a {size} px frame ({type(e).__name__}: "
            f"{first_line(e)}); see --help for what it must be"
        )
    shape = tuple(f.shape)
    if shape[2:] == (grid, grid):
        return shape[1]
    if len(shape) == 3 and shape[1] == grid * grid:
        return shape[2]
    raise SystemExit(
        f"error: --encoder {what} gave features of shape {shape} for a {size} px frame, not "
        f"(1, C, {grid}, {grid}) or (1, {grid * grid}, C) on the latent grid"
    )


def resnet18_backbone(weights, grid, pretrained, trainable):
    """torchvision's ResNet-18 up to layer2 (stride 8, 128 channels), fed frames of 8 x grid px
    (at the default grid, the frames as they are). ImageNet weights from `weights` (default:
    torchvision's cache) when pretrained; else the checkpoint brings them. Never downloads."""
    try:
        import torchvision
    except Exception as e:  # missing, or built for another torch
        raise SystemExit(
            f"error: --encoder resnet18 needs torchvision ({type(e).__name__}: {first_line(e)}); "
            "install the torchvision that matches your torch (pip install torchvision), or use "
            "another --encoder"
        )
    net = torchvision.models.resnet18(weights=None)
    if pretrained:
        path = weights or os.path.join(torch.hub.get_dir(), "checkpoints", RESNET18_FILE)
        read_weights(path, "resnet18", net)
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2")
    net = nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names)).eval()
    channels = feature_channels(net, 3, 8 * grid, grid, "resnet18")
    return Backbone(net, channels, 8 * grid, imagenet=True, trainable=trainable)


def dinov2_backbone(source, grid, pretrained, trainable):
    """DINOv2 ViT-S/14's normalised last-layer patch features, fed frames of 14 x grid px, so that
    its patches are the latent grid. From a TorchScript file (its forward: frames -> a feature map
    or patch tokens), or from a local torch.hub folder of facebookresearch/dinov2 (default: torch
    hub's own copy) with the weights of torch.hub's cache when pretrained. Never downloads."""
    hub = torch.hub.get_dir()
    source = source or os.path.join(hub, DINOV2_REPO)
    size = 14 * grid
    if os.path.isfile(source):
        try:
            net = torch.jit.load(source, map_location="cpu").eval()
        except Exception as e:
            raise SystemExit(
                f"error: cannot load the TorchScript file {source} ({type(e).__name__}: "
                f"{first_line(e)}); {WEIGHTS_ADVICE['dinov2']}"
            )
    elif os.path.isfile(os.path.join(source, "hubconf.py")):
        try:
            vit = torch.hub.load(source, "dinov2_vits14", source="local", pretrained=False)
        except Exception as e:
            raise SystemExit(
                f"error: cannot build dinov2_vits14 from {source} ({type(e).__name__}: "
                f"{first_line(e)}); {WEIGHTS_ADVICE['dinov2']}"
            )
        if pretrained:
            read_weights(os.path.join(hub, "checkpoints", DINOV2_FILE), "dinov2", vit)
        net = DinoPatches(vit).eval()
    else:
        raise SystemExit(
            f"error: no DINOv2 at {source} (a TorchScript file, or a torch.hub folder with "
            f"hubconf.py); {WEIGHTS_ADVICE['dinov2']}"
        )
    channels = feature_channels(net, 3, size, grid, "dinov2")
    backbone = Backbone(net, channels, size, imagenet=True, trainable=trainable)
    mask = getattr(getattr(net, "vit", None), "mask_token", None)
    if mask is not None:  # used in masked pre-training only: DDP would wait for its gradient
        mask.requires_grad_(False)
    return backbone


def vqvae_backbone(path, args, channels):
    """The frozen encoder of a train_vqvae.py first stage (an exported program at its training
    resolution): z_e (B, 4, H/8, W/8), normalised per channel with the latent statistics of its
    training clips."""
    files = [os.path.join(path, f"first_stage{s}") for s in (".json", "_encode.pt2")]
    make = f"python train_vqvae.py --data {args.data} --resolution {args.resolution} --out-dir "
    make += shlex.quote(path)
    if not all(os.path.isfile(f) for f in files):
        raise SystemExit(
            f"error: no first stage in {path} (first_stage.json, first_stage_encode.pt2); make "
            f"one with `{make}`"
        )
    try:
        with open(files[0]) as f:
            meta = json.load(f)
        size, got = meta["resolution"], meta["channels"]
        net = torch.export.load(files[1]).module()
    except Exception as e:
        raise SystemExit(
            f"error: cannot load the first stage in {path} ({type(e).__name__}: "
            f"{first_line(e)}); make one with `{make}`"
        )
    if (size, got) != (args.resolution, channels):
        raise SystemExit(
            f"error: the first stage in {path} takes {got}-channel {size} px frames, --data "
            f"{args.data} at --resolution {args.resolution} gives {channels}-channel "
            f"{args.resolution} px ones; pass --resolution {size} or make one with `{make}`"
        )
    grid = latent_grid(args)
    feat = feature_channels(net, channels, size, grid, f"vqvae:{path}")
    stats = (meta.get("latent_mean", 0.0), meta.get("latent_std", 1.0))
    return Backbone(net, feat, size, imagenet=False, shift=stats[0], scale=stats[1])


def build_backbone(args, channels, pretrained):
    """The pretrained encoder of --encoder (None for conv), frozen unless --finetune-encoder.
    pretrained: load its pretrained weights (not when a checkpoint brings them)."""
    kind = encoder_kind(args.encoder)
    grid = latent_grid(args)
    trainable = args.finetune_encoder
    if kind == "resnet18":
        return resnet18_backbone(args.encoder_weights, grid, pretrained, trainable)
    if kind == "dinov2":
        return dinov2_backbone(args.encoder_weights, grid, pretrained, trainable)
    if kind == "vqvae":
        return vqvae_backbone(args.encoder[len("vqvae:") :], args, channels)
    return None


# ----------------------------------------------------------------------------- data
def resolve_data(args):
    """--data-dir implies its kind when --data is left at its default (toy_data.data_kind); with
    another generated kind it stops with one line instead of being ignored."""
    try:
        args.data = toy_data.data_kind(args.data, args.data_dir, Args.data)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")


NO_ACTIONS = (
    "needs data with actions: --data agent, or a folder of videos with <stem>.actions.txt files "
    "(docs/data.md); drop --actions to train without them"
)


def load_clips(args, n_clips, n_frames, split, rank=0, world=1):
    """Generate clips once into a uint8 (N, T, C, H, W) tensor; rank r keeps clips r, r+world, ...
    -> (clips, their actions (N, T) int64 under --actions, else None)."""
    try:
        ds = toy_data.make_dataset(
            args.data, n_clips, args.resolution, n_frames, args.seed, split, args.data_dir
        )
    except (ValueError, FileNotFoundError, OSError) as e:
        hint = ""
        if "too many" in str(e):
            hint = " (training clips have --frames frames, held-out ones --context + --rollout)"
        raise SystemExit(f"error: {e}{hint}")
    threads = torch.get_num_threads()
    # per-frame simulation ops are tiny: extra threads only contend (5x slower on a busy CPU)
    torch.set_num_threads(1)
    try:
        indices = range(rank, min(n_clips, len(ds)), world)
        shown = progress(indices, len(indices), f"{split} clips", show=rank == 0)
        # uint8 clip by clip, not after the stack: no float copy of every clip (4 bytes a value)
        items = []
        for i in shown:
            item = ds[i]
            item["video"] = (item["video"].clamp(0, 1) * 255).round().to(torch.uint8)
            items.append(item)
    finally:
        torch.set_num_threads(threads)
    if not items:
        raise SystemExit(
            f"error: --data {args.data} gave no {split} clips; check --data-dir or raise "
            "--train-clips/--eval-clips"
        )
    clips = torch.stack([it["video"] for it in items])
    if not args.actions:
        return clips, None
    if "actions" not in items[0]:
        raise SystemExit(f"error: --actions {NO_ACTIONS}; --data {args.data} has none")
    return clips, torch.stack([it["actions"] for it in items])


def drop_actions(actions, gen, p):
    """Training clips whose actions all become -1 (unknown) with probability p each."""
    drop = torch.rand(len(actions), generator=gen) < p
    return torch.where(drop[:, None], -1, actions)


def sample_batch(pool, gen, args, device, actions=None):
    """Random windows of --context + --horizon frames from random pool clips, in [0, 1], and the
    same windows of their actions (--action-dropout of them unknown), or None."""
    span = args.context + args.horizon
    i = torch.randint(len(pool), (args.batch_size,), generator=gen)
    s = torch.randint(pool.shape[1] - span + 1, (args.batch_size,), generator=gen)
    window = (i[:, None], s[:, None] + torch.arange(span))
    x = pool[window].to(device).float() / 255
    if actions is None:
        return x, None
    return x, drop_actions(actions[window], gen, args.action_dropout).to(device)


def training_data(args, rt):
    """The --train-clips pool (uint8, generated once; rank r keeps clips r, r+world, ...), or with
    --fresh the 'train' data set that every step draws new clips from."""
    if not args.fresh:
        return load_clips(args, args.train_clips, args.frames, "train", rt.rank, rt.world)
    n = args.steps * rt.world * args.batch_size
    return toy_data.make_dataset(
        args.data, n, args.resolution, args.frames, args.seed, "train", args.data_dir
    )


def fresh_batch(ds, step, gen, args, device, rank=0, world=1):
    """--fresh: a step's batch is the next --batch-size clips of the 'train' stream (indices from
    (step * world + rank) * batch_size: each rank, each step new clips), at the pool's uint8
    precision, one random window of --context + --horizon frames each, in [0, 1]; and the same
    windows of their actions under --actions (as sample_batch), else None."""
    first = (step * world + rank) * args.batch_size
    items = [ds[first + j] for j in range(args.batch_size)]
    clips = torch.stack([it["video"] for it in items])
    clips = (clips.clamp(0, 1) * 255).round() / 255
    span = args.context + args.horizon
    s = torch.randint(clips.shape[1] - span + 1, (args.batch_size,), generator=gen)
    window = (torch.arange(args.batch_size)[:, None], s[:, None] + torch.arange(span))
    x = clips[window].to(device)
    if not args.actions:
        return x, None
    actions = torch.stack([it["actions"] for it in items])
    return x, drop_actions(actions[window], gen, args.action_dropout).to(device)


def next_batch(data, step, gen, args, rt):
    """The training batch of a step and its actions (or None): new clips with --fresh, else
    windows of pool clips."""
    if args.fresh:
        return fresh_batch(data, step, gen, args, rt.device, rt.rank, rt.world)
    return sample_batch(data[0], gen, args, rt.device, data[1])


def test_set(args):
    """The clips behind metrics.json (and their actions, or None): the first --test-clips of
    --test-file, or of split 'test'."""
    source = args
    if args.test_file:
        source = replace(args, data="npz", data_dir=args.test_file)
    return load_clips(source, args.test_clips, args.context + eval_rollout(args), "test")


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # compiled graphs serve training steps alone
def evaluate(model, clips, args, device, amp, batch=32, actions=None):
    """Roll out held-out clips as in training: encode --context frames, then predict the rest
    from the model's own latents (with --reencode, from the latents of its decoded frames, as
    play does). Errors are scored on the raw output, PSNR and SSIM on it clamped
    (metrics.prediction_scores). -> (model scores, copy_last scores, loss terms, per-frame tensors,
    frames of the first 4 clips: context reconstructed, then predicted, in [0, 1]).
    actions (N, T): the clips' actions (--actions). On agent data the scores include the agent's
    position error (position_scores)."""
    model.eval()
    c = args.context
    steps = clips.shape[1] - c
    h = min(args.horizon, steps)  # the validation loss covers the trained horizon
    terms = torch.zeros(len(LOSS_NAMES))
    preds, recon_psnr = [], []
    t0 = time.perf_counter()
    for i in range(0, len(clips), batch):
        x = clips[i : i + batch].to(device).float() / 255
        a = None if actions is None else actions[i : i + batch].to(device)
        _, batch_terms, rec, pred = rollout_losses(model, x, h, args, amp, steps, a, args.reencode)
        terms += batch_terms.cpu() * len(x)
        preds.append(pred.float().cpu())
        rec = rec.float().clamp(0, 1).cpu()
        recon_psnr.append(metrics.psnr(rec, x[:, :c].cpu(), per_frame=True))
        if i == 0:
            shown = torch.cat([rec, preds[0].clamp(0, 1)], 1)[:4]
    fps = len(clips) * steps / (time.perf_counter() - t0)
    model.train()
    truth = clips[:, c - 1 :].float() / 255  # the last context frame (for copy_last), the targets
    scores, curves = metrics.score_prediction(
        torch.cat(preds), truth[:, :1], truth[:, 1:], args.horizon
    )
    if args.data == "agent":
        copy = truth[:, :1].expand_as(truth[:, 1:])
        for name, video in (("model", torch.cat(preds)), ("copy_last", copy)):
            scores[name].update(position_scores(video, truth[:, 1:], args.horizon))
            scores[name].update(pushed_ball_scores(video, truth[:, :1], truth[:, 1:], args.horizon))
    val = dict(zip(LOSS_NAMES, (terms / len(clips)).tolist()))
    val["recon_psnr"] = float(torch.cat(recon_psnr).mean())
    val["gen_frames_per_s"] = fps
    return scores["model"], scores["copy_last"], val, curves, shown


def position_scores(pred, truth, horizon):
    """The agent's position in predicted frames (N, T, C, H, W) against the true frames (the
    simulator's, under the same actions), in cells (toy_data.position_error): the mean error
    over the first `horizon` frames and over all, per frame, and the share of frames in the exact
    cell."""
    cells = toy_data.agent_cells(truth).round()  # exact on simulated frames
    err, hit = toy_data.position_error(pred, cells)
    return {
        "agent_error": float(err[:, :horizon].mean()),
        "agent_error_rollout": float(err.mean()),
        "agent_error_per_frame": err.mean(0).tolist(),
        "agent_cell_hit": float(hit[:, :horizon].mean()),
        "agent_cell_hit_rollout": float(hit.mean()),
    }


def pushed_ball_scores(pred, last, truth, horizon):
    """The balls the agent pushed, read from frames (toy_data.ball_map): the cells that hold a
    ball in a true frame but not in the last context frame `last` (N, 1, C, H, W) are arrivals,
    the cells that held one there and no longer do are departures. `arrived`: the share of
    arrivals where the predicted frame shows a ball; `left`: the share of departures where it
    shows none; over the first `horizon` frames and over all. copy_last scores 0 on both, frames
    without balls 0 and 1. `balls_exact`: the share of frames whose every cell holds a ball in the
    prediction exactly when it does in the truth (a ball shown where none is counts too)."""
    true, start, got = toy_data.ball_map(truth), toy_data.ball_map(last), toy_data.ball_map(pred)
    arrivals, departures = true & ~start, ~true & start
    exact = (got == true).flatten(-2).all(-1)
    scores = {}
    for suffix, frames in (("", slice(0, horizon)), ("_rollout", slice(None))):
        a, d = arrivals[:, frames], departures[:, frames]
        scores["pushed_ball_arrived" + suffix] = float(got[:, frames][a].float().mean())
        scores["pushed_ball_left" + suffix] = float((~got[:, frames][d]).float().mean())
        scores["pushed_ball_cells" + suffix] = int(a.sum())
        scores["balls_exact" + suffix] = float(exact[:, frames].float().mean())
    return scores


BRANCHES = (1, 2, 3, 4)  # up, down, left, right, each held for --horizon steps


def branch_futures(model, ds, i, args, device):
    """Clip i's context, then each of BRANCHES held for --horizon steps, in the model and in the
    simulator from the same room. -> predicted, simulated frames (branches, horizon, C, H, W)."""
    c, k = args.context, args.horizon
    item = ds[i]
    room, _ = ds.room(i)
    ds.replay(room, item["actions"][: c - 1])  # the room at the last context frame
    sims = [ds.replay(room.copy(), [b] * (k + 1))["video"][1:] for b in BRANCHES]
    x = (item["video"][:c].clamp(0, 1) * 255).round() / 255  # as the uint8 test clips
    n = len(BRANCHES)
    future = torch.tensor(BRANCHES)[:, None].expand(n, k)
    actions = torch.cat([item["actions"][None, : c - 1].expand(n, c - 1), future], 1)
    x = x[None].expand(n, *x.shape).to(device)
    _, pred, _ = model(x, k, actions.to(device), args.rollout_window, args.reencode)
    return pred.float().clamp(0, 1).cpu(), torch.stack(sims)


def _cell_distance(a, b, lost=toy_data.AGENT_GRID):
    """Distances (...) between positions (..., 2) in cells; a NaN position (lost) counts `lost`."""
    d = (a - b).norm(dim=-1)
    return torch.where(d.isnan(), float(lost), d)


def spread(pos):
    """Mean distance between the branches of positions (clips, branches, steps, 2), over the
    pairs where both positions are found (NaN if none)."""
    d = (pos[:, :, None] - pos[:, None]).norm(dim=-1)  # (clips, branch, branch, steps)
    off = ~torch.eye(pos.shape[1], dtype=torch.bool)
    return d[:, off].nanmean()


@torch.no_grad()
@torch.compiler.set_stance("force_eager")
def counterfactual(model, args, device, n_clips=16):
    """Same context, different futures: for the first n_clips test clips, each of BRANCHES from
    the same context in the model and in the simulator. Errors are agent position distances in
    cells averaged over the --horizon steps: `matched` compares each predicted branch with its own
    simulator branch, `mismatched` with the others' (an action-blind model scores the same on
    both); `spread` is the mean distance between branches (model and simulator).
    -> (scores, frames of clip 0: simulator and model rows per branch)."""
    model.eval()
    ds = toy_data.make_dataset(
        "agent", n_clips, args.resolution, args.context + args.horizon, args.seed, "test"
    )
    pos = []  # (model, simulator) positions (branches, horizon, 2) per clip
    for i in range(n_clips):
        pred, sim = branch_futures(model, ds, i, args, device)
        pos.append((toy_data.agent_cells(pred), toy_data.agent_cells(sim)))
        if i == 0:
            shown = torch.stack([v for pair in zip(sim, pred) for v in pair])
    model.train()
    m = torch.stack([p[0] for p in pos])  # (clips, branches, horizon, 2)
    s = torch.stack([p[1] for p in pos])
    err = _cell_distance(m[:, :, None], s[:, None]).mean((0, 3))  # (model branch, sim branch)
    off = ~torch.eye(len(BRANCHES), dtype=torch.bool)
    scores = {
        "branches": [toy_data.ACTIONS[b] for b in BRANCHES],
        "n_clips": n_clips,
        "steps": args.horizon,
        "matched_error": float(err.diagonal().mean()),
        "mismatched_error": float(err[off].mean()),
        "error_matrix": err.tolist(),
        "model_spread": float(spread(m)),
        "simulator_spread": float(spread(s)),
    }
    return scores, shown


def save_counterfactual(shown, scores, args):
    """samples/counterfactual.png: per branch, the simulator's row, then the model's."""
    captions = [
        f"{who}: {name} x{args.horizon} after the same context"
        for name in scores["branches"]
        for who in ("simulator", "model")
    ]
    path = os.path.join(args.out_dir, "samples", "counterfactual.png")
    viz.save_video_grid(shown, path, captions)
    return path


def action_report(raw, args, rt, clips):
    """With --actions: the same model with every action unknown on the test clips
    (baselines.actions_zeroed) and, on agent data, the counterfactual branches."""
    if not args.actions:
        return {}
    zeroed = torch.full_like(clips[1], -1)
    out = {"actions_zeroed": evaluate(raw, clips[0], args, rt.device, rt.amp, actions=zeroed)[0]}
    z = out["actions_zeroed"]
    line = f"test, actions zeroed: PSNR {z['psnr']:.2f} dB"
    if "agent_error" in z:
        line += (
            f", agent error {z['agent_error']:.2f} cells ({z['agent_error_rollout']:.2f} rollout)"
        )
    if args.data == "agent":
        cf, shown = counterfactual(raw, args, rt.device)
        save_counterfactual(shown, cf, args)
        out["counterfactual"] = cf
        line += (
            f"; counterfactual ({', '.join(cf['branches'])} x{cf['steps']}): error to its own "
            f"simulator branch {cf['matched_error']:.2f} cells, to the others "
            f"{cf['mismatched_error']:.2f}; spread model {cf['model_spread']:.2f}, simulator "
            f"{cf['simulator_spread']:.2f}"
        )
    print(line, flush=True)
    return out


def save_samples(clips, frames, curves, args, step, writer):
    """truth | prediction | |error| GIF with the context boundary marked, a still strip with
    per-frame MSE (sum over pixels) under each predicted row, and the same comparison in
    TensorBoard."""
    truth, pred = clips[:4].float() / 255, frames[:4]
    gif = os.path.join(args.out_dir, "samples", f"rollout_{step:06d}.gif")
    videos = {"truth": truth, "prediction": pred}
    cmp = viz.create_video_comparison(videos, gif, context_frames=args.context)
    rows, captions = [], []
    for i in range(min(2, len(truth))):
        mse = " ".join(f"{m:.0f}" for m in curves["model"]["mse_frame_sum"][i].tolist())
        rows += [truth[i], pred[i]]
        captions += [
            f"clip {i}: truth (frames 1-{args.context} are the context)",
            f"clip {i}: context reconstructed, then predicted; MSE per predicted frame: {mse}",
        ]
    strip = os.path.join(args.out_dir, "samples", "rollout_latest.png")
    viz.save_video_grid(torch.stack(rows), strip, captions)
    viz.log_video(writer, "samples/truth_prediction_error", np.moveaxis(cmp, -1, 1), step, fps=4)


def save_plots(curves, args):
    labels = {
        "psnr": "PSNR (dB)",
        "ssim": "SSIM",
        "mse_frame_sum": "MSE per frame (sum over pixels)",
    }
    for name, label in labels.items():
        file = "horizon.png" if name == "psnr" else f"horizon_{name}.png"
        viz.plot_metric_vs_horizon(
            {k: v[name] for k, v in curves.items()},
            os.path.join(args.out_dir, "plots", file),
            metric=label,
            context=args.context,
            train_horizon=args.horizon,
        )


def agent_line(ours, base):
    """The agent's position error for the eval line (agent data), else ''."""
    if "agent_error" not in ours:
        return ""
    return (
        f"  agent error {ours['agent_error']:.2f} cells ({base['agent_error']:.2f}), "
        f"{ours['agent_error_rollout']:.2f} ({base['agent_error_rollout']:.2f}) over the rollout;"
        f" pushed balls arrived {ours['pushed_ball_arrived']:.0%}, "
        f"{ours['pushed_ball_arrived_rollout']:.0%} over the rollout"
    )


def run_eval(raw, eval_clips, args, rt, step, writer, tag="eval"):
    """Evaluate on held-out clips (clips, actions or None), print the line (tag "eval": val clips,
    "test": test clips) and log it (rank 0)."""
    clips, actions = eval_clips
    ours, base, val, curves, frames = evaluate(raw, clips, args, rt.device, rt.amp, actions=actions)
    if writer:
        for k, v in ours.items():
            if isinstance(v, float):
                writer.add_scalar(f"eval/{k}", v, step)
                writer.add_scalar(f"eval/copy_last_{k}", base[k], step)
        for k, v in val.items():
            writer.add_scalar(("perf/" if k.endswith("_per_s") else "eval/val_") + k, v, step)
    rollout = eval_rollout(args)
    print(
        f"{tag} step {step}: PSNR {ours['psnr']:.2f} dB (copy_last {base['psnr']:.2f})  "
        f"SSIM {ours['ssim']:.4f} ({base['ssim']:.4f})  MSE/frame {ours['mse_frame_sum']:.1f} "
        f"({base['mse_frame_sum']:.1f}) over {args.horizon} frames; {rollout} frames: "
        f"PSNR {ours['psnr_rollout']:.2f} ({base['psnr_rollout']:.2f})  loss {val['loss']:.4f}"
        f"  recon PSNR {val['recon_psnr']:.2f}" + agent_line(ours, base),
        flush=True,
    )
    return ours, base, val, curves, frames


def eval_and_keep_best(raw, eval_clips, args, rt, arch, step, best, writer):
    """run_eval; when the validation loss is the lowest yet, write ckpt_best.pt with the weights
    only (what --eval-only needs). -> (evaluation, best validation loss)."""
    results = run_eval(raw, eval_clips, args, rt, step, writer)
    val_loss = results[2]["loss"]
    if not val_loss < best:
        return results, best
    ckpt = {
        "script": SCRIPT,
        "step": step,
        "args": asdict(args),
        "arch": arch,
        "model": raw.state_dict(),
        "val_loss": val_loss,
    }
    save_atomic(ckpt, os.path.join(args.out_dir, "ckpt_best.pt"))
    return results, val_loss


def write_metrics(results, perf, args, step, best, test_clips, writer, t_start, selected, extra):
    """Final samples, plots and metrics.json (rank 0): figures of the test clips (clips, actions),
    from the weights of step `selected` (best on val); extra: action_report's."""
    ours, base, val, curves, frames = results
    test_clips = test_clips[0]
    save_samples(test_clips, frames, curves, args, step, writer)
    save_plots(curves, args)
    perf["gen_frames_per_s"] = val.pop("gen_frames_per_s")
    data = {
        "kind": args.data,
        "resolution": args.resolution,
        "split": "test",
        "test_file": args.test_file,
        "n_eval": test_clips.shape[0],
        "context": args.context,
        "horizon": args.horizon,
        "rollout": eval_rollout(args),
    }
    report = {
        "script": SCRIPT,
        "step": step,
        "wall_s": round(time.time() - t_start, 1),
        "eval": ours,
        "baselines": {
            "copy_last": base,
            **{k: v for k, v in extra.items() if k != "counterfactual"},
        },
        "counterfactual": extra.get("counterfactual"),
        "losses": val,  # on the same test clips
        "val": {"best_loss": best if math.isfinite(best) else None, "selected_step": selected},
        "perf": perf,
        "data": data,
    }
    write_json(os.path.join(args.out_dir, "metrics.json"), report)


def report_test(raw, args, rt, step, best, perf, writer, t_start):
    """metrics.json (rank 0): the weights that were best on val (ckpt_best.pt; under --eval-only
    the checkpoint's own) rolled out on the test clips. -> (run_eval's tuple, their step)"""
    selected = step
    best_path = os.path.join(args.out_dir, "ckpt_best.pt")
    if not args.eval_only and os.path.isfile(best_path):
        ckpt = torch.load(best_path, map_location="cpu", weights_only=True)
        raw.load_state_dict(ckpt["model"])
        selected = ckpt["step"]
    clips = test_set(args)
    results = run_eval(raw, clips, args, rt, step, None, "test")
    extra = action_report(raw, args, rt, clips)
    write_metrics(results, perf, args, step, best, clips, writer, t_start, selected, extra)
    return results, selected


def summary(results, args, selected, wall_s=None):
    """The last lines of a run: the test figures (the published tables' MSE and MAE per frame,
    SSIM in both conventions) against copy-last and where the outputs are."""
    ours, base = results[:2]
    files = "metrics.json, samples/, plots/"
    run = f"the checkpoint of step {selected}"
    if wall_s is not None:
        files = "ckpt.pt, ckpt_best.pt, metrics.json, samples/, plots/, TensorBoard events"
        run = f"weights of step {selected} of {args.steps} (best on val), {wall_s / 60:.1f} min"
    figures = [
        f"{name} MSE {s['mse_frame_sum']:.1f} MAE {s['mae_frame_sum']:.1f} SSIM {s['ssim']:.4f} "
        f"(published tables' convention {s['ssim_openstl']:.4f}) PSNR {s['psnr']:.2f} dB"
        for name, s in (("model", ours), ("copy_last", base))
    ]
    return (
        f"test prediction of {args.horizon} frames after {args.context}, {run}: {figures[0]}; "
        f"{figures[1]}\nin {args.out_dir}: {files} (tensorboard --logdir {args.out_dir})"
    )


# ----------------------------------------------------------------------------- play
PLAY_LETTERS = {"N": 0, "U": 1, "D": 2, "L": 3, "R": 4}  # --play-actions, indices of ACTIONS
PLAY_KEYS = {" ": 0, "up": 1, "w": 1, "down": 2, "s": 2, "left": 3, "a": 3, "right": 4, "d": 4}
PLAY_RESET, PLAY_QUIT = "r", "q"


def playing(args):
    return args.play or args.play_actions is not None


def parse_play_actions(text):
    """--play-actions letters -> action ids, or stop with one line."""
    bad = sorted(set(text.upper()) - set(PLAY_LETTERS))
    if bad or not text:
        raise SystemExit(
            f"error: --play-actions {text!r}: use the letters U D L R and N (none), e.g. RRRUUL"
            + (f"; {''.join(bad)} is not one" if bad else "")
        )
    return [PLAY_LETTERS[ch] for ch in text.upper()]


@torch.no_grad()
def play_reset(model, args, device, clip=0):
    """A game from test clip `clip`: its --context frames encoded, the dynamics run to the last
    one (which waits for the first action), and on agent data the simulator's room at that
    frame. -> game dict: state, room, the last context frame, the latents and actions so far
    (for --rollout-window; the newest latent is where the game stands), and how to feed back
    (--rollout-window, --reencode)."""
    ds = toy_data.make_dataset(
        args.data, clip + 1, args.resolution, args.context, args.seed, "test", args.data_dir
    )
    item = ds[clip]
    c = args.context
    x = (item["video"].clamp(0, 1) * 255).round() / 255  # as the uint8 test clips
    z = model.encode(x.to(device))[None]
    actions = item["actions"][None].to(device)
    state = None
    for t in range(c - 1):
        _, state = model.step(z[:, t].contiguous(), state, actions[:, t])
    room = None
    if isinstance(ds, toy_data.Agent):
        room, _ = ds.room(clip)
        ds.replay(room, item["actions"][: c - 1])
    return {
        "state": state,
        "room": room,
        "frame": x[-1],
        "latents": list(z.unbind(1)),
        "actions": list(actions[:, : c - 1].unbind(1)),
        "window": args.rollout_window,
        "reencode": args.reencode,
        "played": 0,
    }


@torch.no_grad()
def play_step(model, game, action, resolution):
    """One action in the model and the simulator (if any) -> their next frames (C, H, W). The
    model takes rollout()'s step (next_latent)."""
    latents, actions, window = game["latents"], game["actions"], game["window"]
    actions.append(torch.tensor([action], device=latents[-1].device))
    first = not game["played"]
    z, game["state"] = model.next_latent(
        latents, actions, game["state"], window, first, game["reencode"]
    )
    latents.append(z)
    del latents[: -max(window, 1)], actions[: -max(window, 1)]  # a long game keeps only the window
    game["played"] += 1
    frame = model.decode(z)[0].float().clamp(0, 1).cpu()
    sim = None
    if game["room"] is not None:
        game["room"].step(action)
        sim = toy_data.render_agent(game["room"].walls, game["room"].cells()[None], resolution)[0]
    return frame, sim


def play_panels(frame, sim):
    """model | simulator | |difference| x4 as one (H, W', 3) image (the model alone without a
    simulator)."""
    parts = [frame] if sim is None else [frame, sim, ((frame - sim).abs() * 4).clamp(0, 1)]
    gap = torch.ones(3, frame.shape[1], 2)
    return torch.cat([p for part in parts for p in (part, gap)][:-1], 2).permute(1, 2, 0).numpy()


def play_headless(model, args, device):
    """--play-actions: play the letters, write samples/play.gif (model | simulator | difference)
    and print frames/s (the model's and simulator's steps, no drawing). -> model frames."""
    actions = parse_play_actions(args.play_actions)
    game = play_reset(model, args, device)
    start = game["frame"].cpu()
    frames, sims = [], []
    t0 = time.perf_counter()
    for a in actions:
        frame, sim = play_step(model, game, a, args.resolution)
        frames.append(frame)
        sims.append(frame if sim is None else sim)
    fps = len(actions) / (time.perf_counter() - t0)
    frames, sims = torch.stack(frames), torch.stack(sims)
    panels = {"model": frames}
    if game["room"] is not None:
        panels.update(simulator=sims, difference=((frames - sims).abs() * 4).clamp(0, 1))
        err = toy_data.position_error(frames, toy_data.agent_cells(sims).round())[0]
        print(f"agent position error (cells): mean {err.mean():.2f}, last {err[-1]:.2f}")
        b = pushed_ball_scores(frames[None], start[None, None], sims[None], len(actions))
        print(
            f"pushed balls: in {b['pushed_ball_arrived']:.0%} of the {b['pushed_ball_cells']} "
            f"(frame, cell) pairs where the simulator's balls arrived the model shows a ball; "
            f"{b['pushed_ball_left']:.0%} of the cells they left are empty; every ball right in "
            f"{b['balls_exact']:.0%} of the frames"
        )
    path = os.path.join(args.out_dir, "samples", "play.gif")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    viz.create_video_comparison(panels, path, error=False, fps=8)
    still = save_play_still(panels, args.play_actions, path.replace(".gif", ".png"))
    print(f"played {len(actions)} steps at {fps:.1f} frames/s; wrote {path} and {still}")
    return frames


def save_play_still(panels, letters, path, per_row=10):
    """The played steps as a picture: per 10 steps, the simulator's row (if any), then the
    model's, captioned with the keys."""
    rows, captions = [], []
    for i in range(0, len(letters), per_row):
        keys = letters[i : i + per_row]
        for name in ("simulator", "model"):
            if name in panels:
                row = panels[name][i : i + per_row]
                pad = row[-1:].expand(per_row - len(row), *row.shape[1:])  # the last step held
                rows.append(torch.cat([row, pad]))
                captions.append(f"{name}, steps {i + 1}-{i + len(keys)}: {keys}")
    viz.save_video_grid(torch.stack(rows), path, captions)
    return path


def play_key(model, args, device, game, key):
    """A key press of --play -> the panels to show: the next step's, the first ones again after
    r (reset), or None for a key that is no action."""
    if key == PLAY_RESET:
        game.clear()
        game.update(play_reset(model, args, device))
        return play_panels(game["frame"], game["frame"] if game["room"] else None)
    if key not in PLAY_KEYS:
        return None
    return play_panels(*play_step(model, game, PLAY_KEYS[key], args.resolution))


def play_window(model, args, device):
    """--play: a matplotlib window, one model step per key press (turn-based: holding a key
    repeats it); arrows/WASD move, space waits, r resets, q quits."""
    import matplotlib.pyplot as plt

    game = play_reset(model, args, device)
    fig, ax = plt.subplots(figsize=(9, 3.4))
    fig.canvas.mpl_disconnect(fig.canvas.manager.key_press_handler_id)  # no default keymap
    first = game["frame"] if game["room"] else None
    im = ax.imshow(play_panels(game["frame"], first), interpolation="nearest")
    ax.set_axis_off()
    ax.set_title("model | simulator | difference: arrows/WASD move, space waits, r reset, q quit")

    def on_key(event):
        if event.key == PLAY_QUIT:
            plt.close(fig)
            return
        panels = play_key(model, args, device, game, event.key)
        if panels is not None:
            im.set_data(panels)
            fig.canvas.draw_idle()

    fig.canvas.mpl_connect("key_press_event", on_key)
    plt.show()


# ----------------------------------------------------------------------------- training loop
def latent_grid(args):
    """Side of the latent grid: --latent-grid, by default --resolution / 8."""
    return args.latent_grid or args.resolution // 8


def check_data(args):
    """Stop with one line on data flags that cannot work: --data-dir implies its kind (or stops),
    --fresh needs a generated kind, --test-file must give test clips this model can take."""
    resolve_data(args)
    if args.fresh and args.data in ("folder", "npz"):
        raise SystemExit(
            f"error: --fresh draws new generated clips, but --data {args.data} is a fixed set of "
            "videos; drop --fresh (the --train-clips pool samples them)"
        )
    clip = test_set(replace(args, test_clips=1))[0]  # now, not after training
    if args.test_file:
        want = toy_data.channels_of(args.data, args.data_dir)
        if clip.shape[2] != want:
            raise SystemExit(
                f"error: --test-file {args.test_file} has {clip.shape[2]}-channel videos, --data "
                f"{args.data} {want}-channel ones; pass test clips of the same kind"
            )


def check_args(args, ckpt_path):
    """Stop with one line on flags the model or the data cannot take, before anything is written."""
    counts = ["steps", "batch_size", "train_clips", "eval_clips", "test_clips", "frames", "width"]
    check_counts(args, counts + ["hidden", "log_every", "eval_every", "sample_every", "ckpt_every"])
    if args.resolution % 8 or args.resolution < 8:
        raise SystemExit(
            f"error: --resolution {args.resolution} is not a positive multiple of 8 (the encoder "
            "halves it 3 times); use e.g. 64"
        )
    if latent_grid(args) not in [args.resolution // k for k in (2, 4, 8)]:
        raise SystemExit(
            f"error: --latent-grid {args.latent_grid} must be --resolution {args.resolution} "
            "divided by 2, 4 or 8 (the encoder halves the frame 1 to 3 times)"
        )
    if args.dynamics not in DYNAMICS:
        raise SystemExit(
            f"error: unknown --dynamics {args.dynamics!r}; use one of {', '.join(DYNAMICS)}"
        )
    rollout = eval_rollout(args)
    if min(args.context, args.horizon, rollout) < 1 or args.frames < args.context + args.horizon:
        raise SystemExit(
            "error: need --context, --horizon, --rollout >= 1 and --frames >= --context + "
            f"--horizon, got {args.context}, {args.horizon}, {rollout}, {args.frames}; "
            "raise --frames"
        )
    if args.ckpt and not os.path.isfile(args.ckpt):
        raise SystemExit(
            f"error: --ckpt {args.ckpt} does not exist; pass the path of a {SCRIPT} ckpt.pt"
        )
    if (args.eval_only or playing(args)) and not os.path.isfile(ckpt_path):
        flag = "--eval-only" if args.eval_only else "--play"
        raise SystemExit(
            f"error: {flag} needs a checkpoint but {ckpt_path} does not exist; train first or "
            "pass --ckpt"
        )
    if playing(args):
        parse_play_actions(args.play_actions or "N")
        if not args.actions:
            raise SystemExit("error: --play steps the model with actions: add --actions")
    if not 0 <= args.action_dropout <= 1:
        raise SystemExit(f"error: --action-dropout {args.action_dropout} is not in [0, 1]")
    if args.fsq_levels and (args.fsq_levels < 3 or args.fsq_levels % 2 == 0):
        raise SystemExit(
            f"error: --fsq-levels {args.fsq_levels}: use 0 (off) or an odd number >= 3"
        )
    if not 0 <= args.rollout_window <= args.context or (
        args.rollout_window and args.dynamics == "transformer"
    ):
        raise SystemExit(
            f"error: --rollout-window {args.rollout_window}: use 0, or 1 to --context "
            f"({args.context}) with the gru or lstm dynamics (the transformer has its own window)"
        )
    if args.input_kernel < 1 or args.input_kernel % 2 == 0:
        raise SystemExit(
            f"error: --input-kernel {args.input_kernel}: use an odd number, e.g. 3 or 5"
        )
    check_encoder_flags(args)
    check_data(args)


def model_arch(args, channels):
    """WorldModel's arguments: what a checkpoint must match to be resumed or evaluated."""
    return dict(
        channels=channels,
        width=args.width,
        latent_channels=args.latent_channels,
        dynamics=args.dynamics,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        decoder_attn=args.decoder_attn,
        grid=latent_grid(args),
        window=args.context,
        down=round(math.log2(args.resolution // latent_grid(args))),
        encoder=encoder_kind(args.encoder),
        num_actions=len(toy_data.ACTIONS) if args.actions else 0,
        action_names=list(toy_data.ACTIONS) if args.actions else [],
        fsq_levels=args.fsq_levels,
        input_kernel=args.input_kernel,
    )


ADDED_ARCH = {"fsq_levels": 0, "input_kernel": 3}  # what checkpoints from before these flags had


def read_checkpoint(path, arch):
    """load_checkpoint, with a checkpoint of another --encoder or other actions refused by that
    flag's name (one from before --encoder has the conv encoder, and no actions)."""
    own = ("encoder", "num_actions", "action_names", *ADDED_ARCH)
    ckpt = load_checkpoint(path, {k: v for k, v in arch.items() if k not in own})
    saved = ckpt.get("arch", {})
    for key, before in ADDED_ARCH.items():
        if saved.get(key, before) != arch[key]:
            raise SystemExit(
                f"error: {path} was trained with --{key.replace('_', '-')} "
                f"{saved.get(key, before)}, not {arch[key]}; pass that or use another --out-dir"
            )
    actions = (saved.get("num_actions", 0), list(saved.get("action_names", [])))
    if actions != (arch["num_actions"], arch["action_names"]):
        fix = "pass --actions" if actions[0] else "drop --actions"
        raise SystemExit(
            f"error: {path} takes {actions[0]} actions {actions[1]}, this run "
            f"{arch['num_actions']} {arch['action_names']}; {fix} or use another --out-dir"
        )
    saved = saved.get("encoder", "conv")
    if saved != arch["encoder"]:
        flag = shlex.quote(ckpt.get("args", {}).get("encoder", saved))
        raise SystemExit(
            f"error: {path} was trained with --encoder {flag}, not {arch['encoder']}; pass "
            f"--encoder {flag} (the checkpoint holds its weights) or use another --out-dir"
        )
    return ckpt


def step_flops(raw, args, rt, channels):
    """FLOPs of one training step per rollout length k, for GFLOP/s and MFU. Counted at k = 1 and
    at --horizon; the cost is affine in k in between."""
    size = args.resolution
    x = torch.zeros(
        args.batch_size, args.context + args.horizon, channels, size, size, device=rt.device
    )
    ends = []

    def step(k):
        rollout_losses(raw, x, k, args, rt.amp)[0].backward()

    for k in (1, args.horizon):
        ends.append(count_flops(lambda: step(k)))
    raw.zero_grad(set_to_none=True)
    slope = ends[1] - ends[0]
    return {
        k: ends[0] + slope * (k - 1) / max(1, args.horizon - 1) for k in range(1, args.horizon + 1)
    }


def wrap_model(raw, rt):
    """The module the training step calls: compiled per-frame parts, in DDP when distributed.
    Compiling whole rollouts would make a graph per curriculum length. The decoder's batch (frames
    of a rollout) grows with the curriculum: one graph with a symbolic batch. The transformer's
    cache grows frame by frame (a graph per length), so its dynamics stay eager."""
    if rt.compile:
        raw.encoder.compile()  # in place: the state_dict keeps its plain keys
        raw.decoder.compile(dynamic=True)
        if not isinstance(raw.dynamics, CausalTransformer):
            raw.dynamics.compile()
    return wrap_ddp(raw, rt)


def build_model(args, rt, ckpt_path, arch):
    """The model, with the weights of ckpt_path when resuming, evaluating or playing.
    -> (model, checkpoint or None)."""
    ckpt = None
    use = args.eval_only or playing(args)
    if (args.resume or use) and os.path.isfile(ckpt_path):
        ckpt = read_checkpoint(ckpt_path, arch)
    if ckpt and not use and "optimizer" not in ckpt:
        raise SystemExit(
            f"error: {ckpt_path} holds best weights only; resume from ckpt.pt or evaluate it with "
            "--eval-only"
        )
    backbone = build_backbone(args, arch["channels"], pretrained=ckpt is None)
    raw = WorldModel(**arch, backbone=backbone).to(rt.device)
    if ckpt:
        load_weights(raw, ckpt["model"], ckpt_path)
    if ckpt and not use:  # the encoder's weights come from the checkpoint
        check_resume(ckpt, args, ckpt_path, free=("encoder", "encoder_weights"))
    return raw, ckpt


def play(raw, args, rt):
    """--play or --play-actions on the checkpoint (rank 0), fp32."""
    raw.eval()
    if rt.master and args.play_actions is not None:
        play_headless(raw, args, rt.device)
    elif rt.master:
        play_window(raw, args, rt.device)
    teardown(rt)


def eval_only(raw, args, rt, step, best):
    """--eval-only: metrics.json, samples and plots of the checkpoint on the test clips (rank 0);
    no checkpoint, args.json or events are written."""
    if rt.master:
        for sub in ("samples", "plots"):
            os.makedirs(os.path.join(args.out_dir, sub), exist_ok=True)
        n_params = sum(p.numel() for p in raw.parameters())
        perf = {"train_samples_per_s": None, "mfu": None, "params": n_params}
        results, _ = report_test(raw, args, rt, step, best, perf, None, time.time())
        print(summary(results, args, step))
    teardown(rt)


def start_line(args, rt, raw, data, step):
    """The first line of a training run."""
    clips = f"new training clips every step (split 'train'; {len(data)} in all)"
    if not args.fresh:
        clips = f"{len(data[0])} training clips/rank"
    if args.actions:
        clips += f" with actions ({', '.join(toy_data.ACTIONS)})"
    grid = latent_grid(args)
    n_params = sum(p.numel() for p in raw.parameters())
    encoder = ""
    if raw.backbone is not None:
        trained = sum(p.numel() for p in raw.parameters() if p.requires_grad)
        how = "fine-tuned" if args.finetune_encoder else "frozen"
        encoder = f" ({trained / 1e6:.2f}M trained), {args.encoder} encoder {how} + adapter"
    return (
        f"train_world_model: {n_params / 1e6:.2f}M params{encoder}, {args.dynamics} dynamics, "
        f"{args.latent_channels}x{grid}x{grid} latents, {rt.device.type} {rt.dtype}, compile "
        f"{rt.compile}, world {rt.world}, {clips} of {args.data}, from step {step} to "
        f"{args.steps}; outputs in {args.out_dir}"
    )


def make_optimizer(raw, args, rt, ckpt):
    """AdamW, the fp16 loss scaler and this rank's data generator, restored from ckpt to resume."""
    gen = torch.Generator().manual_seed(args.seed + 1000 * rt.rank)
    opt = torch.optim.AdamW(
        [p for p in raw.parameters() if p.requires_grad],  # a frozen encoder stays out
        lr=args.lr,
        betas=(0.9, 0.99),
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
    ckpt_path = args.ckpt or os.path.join(args.out_dir, "ckpt.pt")
    check_args(args, ckpt_path)  # validate everything before anything is written
    eval_clips = load_clips(args, args.eval_clips, args.context + eval_rollout(args), "val")
    arch = model_arch(args, eval_clips[0].shape[2])
    raw, ckpt = build_model(args, rt, ckpt_path, arch)
    step = ckpt["step"] if ckpt else 0
    best = ckpt.get("best_val", math.inf) if ckpt else math.inf
    if playing(args):
        play(raw, args, rt)
        return
    if args.eval_only:
        eval_only(raw, args, rt, step, best)
        return

    # ---- training state
    # (clips, frames, C, H, W) uint8
    pool = training_data(args, rt)
    opt, scaler, gen = make_optimizer(raw, args, rt, ckpt)
    flops = step_flops(raw, args, rt, arch["channels"])  # on the eager model, before compiling
    model = wrap_model(raw, rt)
    n_params = sum(p.numel() for p in raw.parameters())
    writer = None  # TensorBoard, rank 0 only
    if rt.master:
        writer = open_writer(args, step)
        print(start_line(args, rt, raw, pool, step), flush=True)

    # ---- loop
    meter = LossMeter([*LOSS_NAMES, "rollout"], rt.device)
    state = {"model": raw, "optimizer": opt, "scaler": scaler}  # what a checkpoint holds
    ckpt_file = os.path.join(args.out_dir, "ckpt.pt")
    speed = SpeedMeter(step, peak_flops(rt))
    t_start = time.time()
    results = None
    with Control(rt) as control:
        while step < args.steps:
            lr = lr_at(step, args.steps, args.lr, args.warmup_steps)
            set_lr([opt], lr)
            k = rollout_len(step, args)
            x, actions = next_batch(pool, step, gen, args, rt)
            terms = train_step(model, opt, scaler, x, k, args, rt.amp, actions)
            meter.add(torch.cat([terms, terms.new_tensor([k])]))
            step += 1
            speed.tick(step, flops[k] if flops else None)
            stop, log_now = control.poll(step, speed.start)
            last = step == args.steps
            if log_now or step % args.log_every == 0 or last:
                samples = args.batch_size * rt.world
                log_progress(
                    meter, speed, writer, raw.parameters(), rt, step, args.steps, lr, samples
                )
            # before the checkpoint: it holds best_val
            if rt.master and not stop and (step % args.eval_every == 0 or last):
                results, best = eval_and_keep_best(
                    raw, eval_clips, args, rt, arch, step, best, writer
                )
            if rt.master and not (last or stop) and step % args.sample_every == 0:
                shown = [None if v is None else v[:4] for v in eval_clips]
                _, _, _, curves, frames = evaluate(
                    raw, shown[0], args, rt.device, rt.amp, actions=shown[1]
                )
                save_samples(eval_clips[0], frames, curves, args, step, writer)
            if stop or step % args.ckpt_every == 0 or last:
                # never save weights that have gone non-finite since the last log
                meter.means(rt, raw.parameters(), f"before step {step}")
                save_checkpoint(
                    ckpt_file, step, args, arch, gen.get_state(), rt, **state, best_val=best
                )
            if stop:
                raise SystemExit(
                    f"interrupted after step {step}; saved {ckpt_file}: run the same command to "
                    "resume"
                )
            speed.lap()  # evaluation and checkpoint time stay out of the speed figures

    if rt.master:
        if results is None:  # none yet when resuming a finished run
            results, best = eval_and_keep_best(raw, eval_clips, args, rt, arch, step, best, writer)
        perf = speed.summary(args.batch_size * rt.world)
        perf.update(params=n_params, device=device_name(rt), dtype=rt.dtype)
        results, selected = report_test(raw, args, rt, step, best, perf, writer, t_start)
        writer.close()
        curves_png = os.path.join(args.out_dir, "plots", "training_curves.png")
        viz.plot_training_curves(args.out_dir, curves_png)
        print(summary(results, args, selected, time.time() - t_start))
    teardown(rt)


if __name__ == "__main__":
    run(main, tyro.cli(Args))
