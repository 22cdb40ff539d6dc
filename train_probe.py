"""The probe behind metrics.fd_probe and metrics.prompt_alignment: a small 3D CNN on toy videos.

FVD needs I3D weights and CLIP scores need CLIP weights; neither can be downloaded here, and 64x64
toy video is far outside their training domain anyway. This script trains their in-repo stand-in,
metrics.VideoProbe (four Conv3d blocks, BatchNorm, global mean pool, one linear head per label
set), on the train split of every toy data kind (metrics.PROBE_KINDS), resized to 16 frames of
32x32 RGB (metrics.probe_input). Its heads name:

- the data kind, and whether the frames are in order: a quarter of each batch is frame-shuffled,
  which makes the pooled features (what fd_probe compares) sensitive to temporal order, so
  fd_probe sees broken motion and not only appearance;
- for prompted shapes, the type, shape, colour, target colour and motion a prompt can name
  (prompt_alignment reads these heads back).

Prompted-shape clips are played backwards and mirrored at random with their labels swapped to
match: this doubles the motion examples and forces the motion head to read direction from motion.
Shapes (five attribute heads) and rotations (direction is the slowest to learn) are oversampled.
The held-out accuracy of each head (test split) goes into the checkpoint and metrics.json.

The probe defines a metric, so it trains one way: fp32 (--dtype), one process (no torchrun), one
CPU thread by default. The same seed and steps give the same weights, run after run.

    python train_probe.py                                  # 1-2 min on CPU; ~/.cache/nanoworld/
    python train_probe.py --steps 300 --out /tmp/probe.pt  # a quick probe somewhere else
    NANOWORLD_PROBE=/tmp/probe.pt python train_river.py    # the metrics then read that one
    python train_probe.py --eval-only                      # held-out accuracy of the cached probe
    python metrics.py fd-check                             # fd_probe: real first, controls after

Outputs: the probe at --out (default $NANOWORLD_PROBE, else ~/.cache/nanoworld/probe.pt), in the
format metrics.load_probe reads, and metrics.json beside it (held-out accuracies, speed). The
other scripts' --data, --resolution and --frames do not apply: the probe sees every kind at its
own input size.
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
import torch.nn.functional as F
import tyro
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.tensorboard import SummaryWriter

import metrics
import toy_data


@dataclass
class Args:
    # run
    steps: int = 1200
    """training steps"""
    seed: int = 0
    """random seed: probe init, data sets, batch order, augmentation"""
    out: str | None = None
    """probe to write, metrics.json beside; None: $NANOWORLD_PROBE or ~/.cache/nanoworld/probe.pt"""
    eval_only: bool = False
    """measure the held-out accuracy of the probe at --out, write metrics.json, then exit"""
    log_every: int = 100
    """print the mean training loss every N steps"""
    # system
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto: CUDA if present, else CPU"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """autocast dtype of training; float32, not auto: the probe defines a metric, so its weights
    must not depend on the machine's bf16 support (evaluation is always fp32)"""
    compile: tyro.conf.DisallowNone[bool | None] = None
    """torch.compile the probe for training; None (unset): on for CUDA, off otherwise"""
    threads: int = 1
    """torch CPU threads: one is nearly as fast for this small model and never oversubscribes"""
    # data
    n_per_kind: int = 128
    """training videos per data kind (4x for shapes: five heads); a quarter (at least 4) held out"""
    # optim
    batch_size: int = 32
    """videos per batch"""
    lr: float = 3e-3
    """peak learning rate (AdamW) after a linear warm-up over steps/20, cosine-decayed to 0"""
    weight_decay: float = 0.01
    """AdamW weight decay"""


# ---------------------------------------------------------------------------------- the method
SPIN = {"clockwise": "counter-clockwise", "counter-clockwise": "clockwise"}
SIDE = {"left": "right", "right": "left"}


def probe_labels():
    """The classes of each head. They are saved in the checkpoint: metrics reads them from there."""
    return {
        "kind": list(metrics.PROBE_KINDS),
        "shuffled": ["real", "shuffled"],
        "type": ["moving", "rotating", "color_transition", "bouncing"],
        "shape": list(toy_data.SHAPES),
        "color": list(toy_data.COLORS),
        "color_to": list(toy_data.COLORS),
        "motion": list(toy_data.DIRECTIONS) + list(toy_data.ROTATIONS) + ["bouncing", "none"],
    }


def targets(labels, kind, attrs):
    """Class index per head; -100 (ignored by cross_entropy) where a head does not apply."""
    y = {k: -100 for k in labels}
    y["kind"] = labels["kind"].index(kind)
    y["shuffled"] = 0
    for a in metrics.ATTRS if attrs else ():
        val = attrs.get(a)
        val = "none" if a == "motion" and val is None else val
        if val in labels[a]:
            y[a] = labels[a].index(val)
    return y


def played_backwards(motion):
    """The motion label of a clip played backwards: "a_to_b" -> "b_to_a", a spin reversed."""
    if "_to_" in motion:
        return "_to_".join(motion.split("_to_")[::-1])
    return SPIN.get(motion, motion)


def mirrored(motion):
    """The motion label of a clip mirrored left-right: left <-> right, a spin reversed."""
    if "_to_" in motion:
        return "_".join(SIDE.get(w, w) for w in motion.split("_"))
    return SPIN.get(motion, motion)


def label_maps(labels):
    """Motion-label index permutations for a clip played backwards and for a mirrored clip."""
    mot = labels["motion"]
    return tuple(torch.tensor([mot.index(f(m)) for m in mot]) for f in (played_backwards, mirrored))


def augment(x, y, maps, is_shapes, gen):
    """In place: play prompted-shape clips backwards / mirror them and swap labels to match.
    Doubles the motion examples and forces the motion head to read direction from motion."""
    for dim, perm in zip((2, 4), maps):  # (B, 3, T, H, W): time, then width
        m = is_shapes & (torch.rand(len(x), generator=gen) < 0.5)
        x[m] = x[m].flip(dim)
        has = m & (y["motion"] >= 0)
        y["motion"][has] = perm[y["motion"][has]]
        if dim == 2:  # a colour transition played backwards runs the other way
            ct = m & (y["color_to"] >= 0)
            y["color"][ct], y["color_to"][ct] = y["color_to"][ct], y["color"][ct]


def shuffle_some(x, y, gen, frac=0.25):
    """In place: shuffle the frames of about frac of the clips and label them so. The 'shuffled'
    head makes the features sensitive to temporal order, so fd_probe sees broken motion."""
    shuf = torch.rand(len(x), generator=gen) < frac
    x[shuf] = metrics.shuffle_frames(x[shuf], gen, dim=2)
    y["shuffled"][shuf] = 1
    for k in ("type", "motion"):  # undefined once the frame order is gone
        y[k][shuf] = -100


def probe_loss(logits, y):
    """Sum over the heads that have a label in the batch of their cross-entropy."""
    return sum(
        F.cross_entropy(logits[k], y[k], ignore_index=-100) for k in logits if (y[k] != -100).any()
    )


def forward_loss(model, x, y, amp):
    """The loss of a batch: the one function the training step and the FLOP count share."""
    with amp:
        logits = model(x)
    return probe_loss(logits, y)


def probe_lr(step, total, peak):
    """Linear warm-up over total/20 steps, then cosine decay to 0 (the fence's lr_at decays to
    peak/10 and multiplies the two: another curve, so the probe keeps its own)."""
    warm = max(1, total // 20)
    return peak * min(
        (step + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))
    )


def train_step(model, opt, scaler, x, y, amp):
    """One AdamW step on a batch (no gradient clipping) -> the detached loss."""
    loss = forward_loss(model, x, y, amp)
    optimizer_step(opt, scaler, loss, model.parameters(), 0)
    return loss.detach()


@torch.no_grad()
def accuracy(probe, x, y, gen, device):
    """Held-out accuracy per head; 'shuffled' is scored on the set plus its frame-shuffled copy.
    fp32 and eval mode, as the metrics run the probe."""
    real = []
    shuffled = []
    for i in range(0, len(x), 64):
        xb = x[i : i + 64].float() / 255
        real.append(probe(xb.to(device)))
        shuffled.append(probe(metrics.shuffle_frames(xb, gen, dim=2).to(device))["shuffled"])
    logits = {k: torch.cat([r[k] for r in real]).cpu() for k in y}
    acc = {}
    for k in y:
        ok = y[k] != -100
        if k != "shuffled" and ok.any():
            acc[k] = float((logits[k].argmax(1)[ok] == y[k][ok]).float().mean())
    in_order = (logits["shuffled"].argmax(1) == 0).float().mean()
    caught = (torch.cat(shuffled).cpu().argmax(1) == 1).float().mean()
    acc["shuffled"] = float((in_order + caught) / 2)
    return acc


# ---------------------------------------------------------------------------------------- data
def probe_set(labels, n_per_kind, split, seed):
    """Probe inputs of every kind, uint8 (N, 3, 16, 32, 32), and their targets per head."""
    xs = []
    ys = []
    kinds = metrics.PROBE_KINDS
    for kind in progress(kinds, len(kinds), f"{split} videos, by data kind"):
        n = n_per_kind * (4 if kind == "shapes" else 1)  # shapes feeds five attribute heads
        x, attrs = metrics.toy_probe_videos(kind, n, split, seed)
        xs.append(x)
        ys += [targets(labels, kind, a) for a in attrs]
    return torch.cat(xs), {k: torch.tensor([y[k] for y in ys]) for k in labels}


def train_set(labels, n_per_kind, seed):
    """The training videos with what draw_batch needs: sampling weights and the prompted shapes."""
    x, y = probe_set(labels, n_per_kind, "train", seed)
    is_shapes = y["kind"] == labels["kind"].index("shapes")
    rotating = y["type"] == labels["type"].index("rotating")
    # oversample shapes (five attribute heads) and rotations (direction is the slowest to learn)
    weight = (1 + 2 * is_shapes.float()) * (1 + 2 * rotating.float())
    return {"x": x, "y": y, "weight": weight, "is_shapes": is_shapes, "maps": label_maps(labels)}


def draw_batch(data, batch_size, gen):
    """A training batch in [0, 1]: weighted draw, then time reversal / mirroring of prompted
    shapes and a quarter of the clips frame-shuffled."""
    idx = torch.multinomial(data["weight"], batch_size, replacement=True, generator=gen)
    x = data["x"][idx].float() / 255
    y = {k: v[idx].clone() for k, v in data["y"].items()}
    augment(x, y, data["maps"], data["is_shapes"][idx], gen)
    shuffle_some(x, y, gen)
    return x, y


# ---------------------------------------------------------------------------------- evaluation
def write_report(out, step, t0, acc, perf, data):
    """The accuracies on the console and in metrics.json beside the probe -> that file's path."""
    print("held-out accuracy: " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    report = {
        "script": SCRIPT,
        "step": step,
        "wall_s": round(time.time() - t0, 1),
        "eval": acc,
        "perf": perf,
        "data": data,
    }
    path = os.path.join(os.path.dirname(os.path.abspath(out)), "metrics.json")
    write_json(path, report)
    return path


def evaluate_only(out, args, rt, t0):
    """--eval-only: held-out accuracy of the probe at out (its frame shuffles drawn anew) ->
    metrics.json beside it."""
    if not os.path.isfile(out):
        raise SystemExit(
            f"error: --eval-only needs a probe but {out} does not exist; "
            "train one with `python train_probe.py` or pass --out"
        )
    try:
        probe = metrics.load_probe(out)
    except metrics.MetricUnavailable as e:
        raise SystemExit(f"error: {e}")
    steps = torch.load(out, map_location="cpu", weights_only=True).get("steps")
    x, y = probe_set(probe.labels, max(4, args.n_per_kind // 4), "test", args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    acc = accuracy(probe.to(rt.device), x, y, gen, rt.device)
    n_params = sum(p.numel() for p in probe.parameters())
    perf = {"params": n_params, "device": device_name(rt), "dtype": "float32"}
    data = {"kinds": list(metrics.PROBE_KINDS), "split": "test", "n_eval": len(x)}
    path = write_report(out, steps, t0, acc, perf, data)
    print(f"wrote {path}")


# -------------------------------------------------------------------------------------- the loop
def step_flops(probe, data, batch_size, rt):
    """FLOPs of one training forward and backward, counted on a copy: a forward in train mode
    would move the probe's own BatchNorm statistics."""
    twin = copy.deepcopy(probe)
    x = (data["x"][:batch_size].float() / 255).to(rt.device)
    y = {k: v[:batch_size].to(rt.device) for k, v in data["y"].items()}
    return count_flops(lambda: forward_loss(twin, x, y, rt.amp).backward())


def train(probe, data, args, rt, gen):
    """AdamW, warm-up then cosine; the mean loss every --log-every steps -> the speed summary."""
    model = torch.compile(probe) if rt.compile else probe
    opt = torch.optim.AdamW(probe.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scaler = make_scaler(rt)
    meter = LossMeter(["loss"], rt.device)
    speed = SpeedMeter(0, peak_flops(rt))
    flops = step_flops(probe, data, args.batch_size, rt)
    step = 0
    while step < args.steps:
        lr = probe_lr(step, args.steps, args.lr)
        set_lr([opt], lr)
        x, y = draw_batch(data, args.batch_size, gen)
        y = {k: v.to(rt.device) for k, v in y.items()}
        loss = train_step(model, opt, scaler, x.to(rt.device), y, rt.amp)
        meter.add(loss.view(1))
        step += 1
        speed.tick(step, flops)
        if step % args.log_every == 0 or step == args.steps:
            params = probe.parameters()
            log_progress(meter, speed, None, params, rt, step, args.steps, lr, args.batch_size)
        speed.lap()
    return speed.summary(args.batch_size)


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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit(
            "error: train_probe.py runs as one process (the probe defines a metric: its weights "
            "must not depend on the world size); run it without torchrun"
        )
    check_counts(args, ["steps", "log_every", "threads", "n_per_kind", "batch_size"])
    torch.set_num_threads(args.threads)
    t0 = time.time()
    rt = setup(args)
    out = args.out or metrics.default_probe_path()
    if args.eval_only:
        evaluate_only(out, args, rt, t0)
        return
    labels = probe_labels()
    # right after setup() seeded torch, before anything else draws: the init depends on --seed alone
    probe = metrics.VideoProbe(labels).to(rt.device)
    data = train_set(labels, args.n_per_kind, args.seed)
    test_x, test_y = probe_set(labels, max(4, args.n_per_kind // 4), "test", args.seed)
    n_params = sum(p.numel() for p in probe.parameters())
    print(
        f"train_probe: {n_params / 1e3:.0f}k params, {device_name(rt)} {rt.dtype}, "
        f"compile {rt.compile}; {len(data['x'])} train / {len(test_x)} test videos in "
        f"{time.time() - t0:.1f}s; {args.steps} steps; writes {out}",
        flush=True,
    )
    gen = torch.Generator().manual_seed(args.seed)  # batches, augmentation, then held-out shuffles
    try:
        perf = train(probe, data, args, rt, gen)
    except KeyboardInterrupt:
        raise SystemExit(
            f"interrupted: nothing written, {out} is as it was (a half-trained probe would "
            "silently change the metrics)"
        )
    probe.eval()
    probe.accuracy = accuracy(probe, test_x, test_y, gen, rt.device)
    info = {"script": SCRIPT, "steps": args.steps, "seed": args.seed, "args": asdict(args)}
    metrics.save_probe(probe.cpu(), out, **info)
    perf.update(params=n_params, device=device_name(rt), dtype=rt.dtype)
    kinds = list(metrics.PROBE_KINDS)
    data_info = {"kinds": kinds, "n_train": len(data["x"]), "split": "test", "n_eval": len(test_x)}
    path = write_report(out, args.steps, t0, probe.accuracy, perf, data_info)
    print(f"saved {out} and {path} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    run(main, tyro.cli(Args))
