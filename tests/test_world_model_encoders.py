"""train_world_model.py's encoders: conv (trained, the default), vqvae:DIR (a train_vqvae.py first
stage), resnet18 and dinov2 (pretrained, frozen unless --finetune-encoder, then an adapter).

Nothing here downloads: torchvision is replaced by a stand-in with ResNet-18's layout (the same
state-dict names, narrower), DINOv2 by a tiny module with its interface in a local torch.hub
folder or a TorchScript file, and TORCH_HOME points at a temporary folder."""

import json
import os
import subprocess
import sys
import types
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import train_world_model as wm

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet's, written out
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
TINY = (
    "--steps 4 --log-every 1 --eval-every 2 --sample-every 100 --ckpt-every 2 "
    "--resolution 32 --frames 6 --context 3 --horizon 2 --train-clips 4 --eval-clips 2 "
    "--test-clips 2 --width 4 --hidden 8 --batch-size 2 --dtype float32 --no-compile "
    "--device cpu --warmup-steps 1 --lr 3e-3 --curriculum 0.5"
).split()
VQVAE_TINY = (  # train_vqvae.py at 2 steps on the world model's data and size
    "--data bouncing_balls --resolution 32 --steps 2 --frames 4 --train-clips 4 --eval-clips 2 "
    "--width 8 --codebook-size 16 --batch-size 8 --dtype float32 --no-compile --device cpu "
    "--warmup-steps 1"
).split()


def run(out_dir, *extra):
    wm.main(tyro.cli(wm.Args, args=[*TINY, "--out-dir", str(out_dir), *extra]))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def args_of(*flags):
    return tyro.cli(wm.Args, args=[*TINY, *flags])


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


@pytest.fixture(autouse=True)
def no_pictures(monkeypatch):
    """Samples and plots are most of a tiny run's time and none of the encoders."""
    monkeypatch.setattr(wm, "save_samples", lambda *a: None)
    monkeypatch.setattr(wm, "save_plots", lambda *a: None)
    monkeypatch.setattr(wm.viz, "plot_training_curves", lambda *a: None)


@pytest.fixture(autouse=True)
def torch_home(tmp_path, monkeypatch):
    """torch.hub's folder (and so torchvision's cache) in a temporary folder: empty, no
    downloads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub"


# ----------------------------------------------------------------------------- stand-ins
class Block(nn.Module):
    """torchvision's BasicBlock, written out with its attribute names."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + skip)


class TinyResNet18(nn.Module):
    """ResNet-18's layout and state-dict names (conv1, bn1, maxpool, layer1-4 of two blocks, fc)
    at an eighth of its width; BatchNorm statistics and affine terms randomised, so that training
    mode and eval mode differ."""

    def __init__(self, w=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [w, w, 2 * w, 4 * w, 8 * w]
        for i in range(1, 5):
            cin, cout = widths[i - 1], widths[i]
            first = Block(cin, cout, 1 if i == 1 else 2)
            setattr(self, f"layer{i}", nn.Sequential(first, Block(cout, cout, 1)))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * w, 10)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)


def install_torchvision(monkeypatch, asked):
    """A stand-in `torchvision` whose models.resnet18(weights=...) records what it was asked."""
    tv = types.ModuleType("torchvision")

    def resnet18(weights="IMAGENET1K_V1"):  # torchvision would download for a weights name
        asked.append(weights)
        return TinyResNet18()

    tv.models = types.SimpleNamespace(resnet18=resnet18)
    monkeypatch.setitem(sys.modules, "torchvision", tv)


def resnet_reference(net, x):
    """ResNet-18 up to layer2 on ImageNet-normalised RGB frames, eval mode, written out."""
    x = (x.expand(-1, 3, -1, -1) - MEAN) / STD
    h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer2(net.layer1(h))


VIT_SOURCE = '''
import torch
import torch.nn as nn


class TinyViT(nn.Module):
    """DINOv2's interface, tiny: 14 px patches, a class token (and an unused mask token), one
    layer that mixes every token with the frame's mean, a final norm, get_intermediate_layers."""

    patch_size = 14

    def __init__(self, d=12):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, 14, 14)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        self.mix = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.norm = nn.LayerNorm(d)

    def tokens(self, x):
        p = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(p.shape[0], -1, -1), p], 1)
        return t + self.mix(t - t.mean(1, keepdim=True))

    def get_intermediate_layers(self, x, n=1, reshape=False, norm=True):
        out = self.tokens(x)
        out = self.norm(out) if norm else out
        out = out[:, 1:]
        if reshape:
            B, _, h, w = x.shape
            out = out.reshape(B, h // 14, w // 14, -1).permute(0, 3, 1, 2)
        return (out,)


class Tokens(nn.Module):
    """What a TorchScript file may hold: frames -> normalised patch tokens (B, h * w, d)."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit.get_intermediate_layers(x)[0]
'''

HUBCONF = """
dependencies = ["torch"]
from tinyvit import TinyViT


def dinov2_vits14(pretrained=True, **kwargs):
    if pretrained:
        raise RuntimeError("this would download the weights")
    return TinyViT()
"""


def vit_module():
    space = {}
    exec(VIT_SOURCE, space)
    return space


def make_hub_folder(path):
    path.mkdir(parents=True)
    (path / "tinyvit.py").write_text(VIT_SOURCE)
    (path / "hubconf.py").write_text(HUBCONF)
    return path


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory, one_thread):
    """A tiny exported first stage (32 px bouncing balls -> 4x4x4 latents), made by
    train_vqvae.py as a user would."""
    out = tmp_path_factory.mktemp("vqvae")
    cmd = [sys.executable, "train_vqvae.py", *VQVAE_TINY, "--out-dir", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


# ----------------------------------------------------------------------------- features
def test_resnet18_is_layer2_of_imagenet_normalised_frames(monkeypatch, torch_home, tmp_path):
    """ResNet-18 up to layer2 (stride 8) in eval mode on ImageNet-normalised frames (grey ones
    repeated to RGB) with the weights of torchvision's cache file; frames resized to 8 x the latent
    grid; torchvision is never asked for weights (no download); a frozen encoder keeps no graph."""
    asked = []
    install_torchvision(monkeypatch, asked)
    source = TinyResNet18()
    (torch_home / "checkpoints").mkdir(parents=True)
    torch.save(source.state_dict(), torch_home / "checkpoints" / "resnet18-f37072fd.pth")
    bb = wm.build_backbone(args_of("--encoder", "resnet18"), 3, pretrained=True)
    assert asked == [None]
    net = source.eval()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    with torch.no_grad():
        ref = resnet_reference(net, x)
        grey = torch.rand(2, 1, 32, 32)
        assert torch.allclose(bb(grey), resnet_reference(net, grey), atol=1e-5)
    out = bb(x)
    assert out.shape == (2, 16, 4, 4) and bb.channels == 16
    assert torch.allclose(out, ref, atol=1e-5)
    assert out.grad_fn is None  # frozen: no graph through the pretrained network
    # a finer latent grid (32 / 4 = 8 cells): frames resized to 8 x 8 = 64 px
    fine = wm.build_backbone(args_of("--encoder", "resnet18", "--latent-grid", "8"), 3, True)
    assert fine.size == 64 and fine(x).shape == (2, 16, 8, 8)
    # another state-dict file, given by --encoder-weights
    other = TinyResNet18()
    torch.save(other.state_dict(), tmp_path / "mine.pth")
    mine = wm.build_backbone(
        args_of("--encoder", "resnet18", "--encoder-weights", str(tmp_path / "mine.pth")), 3, True
    )
    with torch.no_grad():
        assert torch.allclose(mine(x), resnet_reference(other.eval(), x), atol=1e-5)


def test_dinov2_patch_features_from_a_hub_folder_and_a_torchscript_file(torch_home, tmp_path):
    """DINOv2: frames resized to 14 x the latent grid, ImageNet-normalised, the normalised
    patch features of get_intermediate_layers on the grid; built by the folder's hubconf with
    pretrained=False (never a download) and the weights of torch.hub's cache; a TorchScript file
    of patch tokens gives the same map."""
    space = vit_module()
    torch.manual_seed(0)
    source = space["TinyViT"]()
    (torch_home / "checkpoints").mkdir(parents=True)
    torch.save(source.state_dict(), torch_home / "checkpoints" / "dinov2_vits14_pretrain.pth")
    repo = make_hub_folder(tmp_path / "dinov2")
    bb = wm.build_backbone(args_of("--encoder", "dinov2", "--encoder-weights", str(repo)), 3, True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        big = F.interpolate(x, size=(56, 56), mode="bilinear", antialias=True)
        ref = source.get_intermediate_layers((big - MEAN) / STD, 1, reshape=True, norm=True)[0]
        out = bb(x)
    assert bb.size == 56 and out.shape == (2, 12, 4, 4)
    assert torch.allclose(out, ref, atol=1e-5)
    script = tmp_path / "dinov2.pt"
    torch.jit.trace(space["Tokens"](source).eval(), torch.rand(1, 3, 56, 56)).save(str(script))
    ts = wm.build_backbone(
        args_of("--encoder", "dinov2", "--encoder-weights", str(script)), 3, True
    )
    with torch.no_grad():
        assert torch.allclose(ts(x), ref, atol=1e-5)  # tokens laid out row by row
    # the default: torch.hub's own copy of the repository
    os.rename(repo, torch_home / "facebookresearch_dinov2_main")
    default = wm.build_backbone(args_of("--encoder", "dinov2"), 3, True)
    with torch.no_grad():
        assert torch.allclose(default(x), ref, atol=1e-5)


def test_vqvae_features_are_normalised_first_stage_latents(first_stage):
    """vqvae:DIR: the exported encoder's z_e of the frames as they are, minus the first stage's
    latent mean, over its std (first_stage.json), per channel."""
    bb = wm.build_backbone(args_of("--encoder", f"vqvae:{first_stage}"), 3, True)
    meta = json.loads((first_stage / "first_stage.json").read_text())
    encode = torch.export.load(str(first_stage / "first_stage_encode.pt2")).module()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        z = encode(x)
        mean = torch.tensor(meta["latent_mean"]).view(1, -1, 1, 1)
        std = torch.tensor(meta["latent_std"]).view(1, -1, 1, 1)
        assert torch.allclose(bb(x), (z - mean) / std, atol=1e-5)
    assert bb.channels == 4 and bb(x).shape == (3, 4, 4, 4)


# ----------------------------------------------------------------------------- training
def trained_states(backbone, steps=3):
    """State dicts of a world model on `backbone` before and after a few training steps."""
    torch.manual_seed(1)
    model = wm.WorldModel(
        3, 4, 4, "gru", hidden=8, grid=4, window=3, encoder="x", backbone=backbone
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    args = wm.Args(context=3, horizon=2)
    x = torch.rand(2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        wm.train_step(model, opt, scaler, x, 2, args, nullcontext())
    return before, model.state_dict()


@pytest.mark.parametrize("finetune", [False, True])
def test_frozen_encoder_stays_adapter_and_decoder_train(monkeypatch, finetune, tmp_path):
    """Frozen (the default): every weight and BatchNorm statistic of the pretrained network is
    unchanged after training steps, while the adapter and the decoder move; --finetune-encoder:
    the network's weights move too, its BatchNorm statistics still do not (eval mode)."""
    install_torchvision(monkeypatch, [])
    torch.save(TinyResNet18().state_dict(), tmp_path / "w.pth")
    flags = ["--encoder", "resnet18", "--encoder-weights", str(tmp_path / "w.pth")]
    flags += ["--finetune-encoder"] * finetune
    before, after = trained_states(wm.build_backbone(args_of(*flags), 3, True))
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    net = {k for k in before if k.startswith("backbone.net.")}
    stats = {k for k in net if "running_" in k or "num_batches" in k}
    weights = {k for k in net if k.endswith("conv1.weight")}
    assert any(k.startswith("encoder.") for k in moved)  # the adapter
    assert any(k.startswith("decoder.") for k in moved)
    assert not (moved & stats)
    assert (moved & weights) == (weights if finetune else set())


def test_dinov2_finetune_moves_the_vit_but_not_its_mask_token(tmp_path):
    """--finetune-encoder on DINOv2: the transformer's weights train; the mask token (used only in
    masked pre-training, so never reached) is left out, as distributed training needs."""
    space = vit_module()
    script = tmp_path / "repo"
    make_hub_folder(script)
    home = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    home.mkdir(parents=True)
    torch.save(space["TinyViT"]().state_dict(), home / "dinov2_vits14_pretrain.pth")
    flags = ["--encoder", "dinov2", "--encoder-weights", str(script), "--finetune-encoder"]
    bb = wm.build_backbone(args_of(*flags), 3, True)
    assert not bb.net.vit.mask_token.requires_grad
    before, after = trained_states(bb)
    assert not torch.equal(
        before["backbone.net.vit.mix.0.weight"], after["backbone.net.vit.mix.0.weight"]
    )


def test_vqvae_run_resume_eval_only_and_refusals(first_stage, tmp_path, monkeypatch, capsys):
    """vqvae:DIR end to end: the checkpoint records the encoder, holds the first stage's weights
    unchanged and trains only the rest; Ctrl-C + resume equals a straight run; --eval-only gives
    the run's test figures again; a conv run refuses the checkpoint by the flag's name."""
    enc = ["--encoder", f"vqvae:{first_stage}"]
    run(tmp_path / "straight", *enc)
    ck = load(tmp_path / "straight" / "ckpt.pt")
    assert ck["arch"]["encoder"] == "vqvae" and ck["args"]["encoder"] == enc[1]
    encode = torch.export.load(str(first_stage / "first_stage_encode.pt2")).module()
    for k, v in encode.state_dict().items():
        assert torch.equal(ck["model"][f"backbone.net.{k}"], v), k
    # the optimiser holds every weight but the first stage's (the world model has no buffers)
    trained = [k for k in ck["model"] if not k.startswith("backbone.")]
    assert len(ck["optimizer"]["param_groups"][0]["params"]) == len(trained)
    assert "vqvae:" in capsys.readouterr().out
    lr_at = wm.lr_at

    def ctrl_c_in_step_3(step, *rest):
        if step == 2:
            os.kill(os.getpid(), __import__("signal").SIGINT)
        return lr_at(step, *rest)

    monkeypatch.setattr(wm, "lr_at", ctrl_c_in_step_3)
    with pytest.raises(SystemExit, match="interrupted after step 3"):
        run(tmp_path / "resumed", *enc)
    monkeypatch.setattr(wm, "lr_at", lr_at)
    run(tmp_path / "resumed", *enc)
    a, b = ck["model"], load(tmp_path / "resumed" / "ckpt.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    best = str(tmp_path / "straight" / "ckpt_best.pt")
    run(tmp_path / "eval", *enc, "--eval-only", "--ckpt", best)
    m1, m2 = (
        json.loads((d / "metrics.json").read_text())
        for d in (tmp_path / "straight", tmp_path / "eval")
    )
    assert m2["eval"]["psnr"] == pytest.approx(m1["eval"]["psnr"], rel=1e-6)
    with pytest.raises(
        SystemExit, match="trained with --encoder vqvae:.*, not conv; pass --encoder"
    ) as e:
        run(tmp_path / "straight", "--eval-only")
    assert "\n" not in str(e.value.code)


def test_resnet18_and_dinov2_runs_and_eval_only_without_the_weights_file(
    monkeypatch, torch_home, tmp_path
):
    """resnet18 and dinov2 end to end (stand-ins, random weights); --eval-only and resume build
    the network without its pretrained weights (the checkpoint holds them), so they need no
    weights file, which a new run does."""
    install_torchvision(monkeypatch, [])
    space = vit_module()
    (torch_home / "checkpoints").mkdir(parents=True)
    files = {"resnet18": "resnet18-f37072fd.pth", "dinov2": "dinov2_vits14_pretrain.pth"}
    torch.save(TinyResNet18().state_dict(), torch_home / "checkpoints" / files["resnet18"])
    torch.save(space["TinyViT"]().state_dict(), torch_home / "checkpoints" / files["dinov2"])
    make_hub_folder(torch_home / "facebookresearch_dinov2_main")
    for kind in ("resnet18", "dinov2"):
        run(tmp_path / kind, "--encoder", kind, "--steps", "2")
        m = json.loads((tmp_path / kind / "metrics.json").read_text())
        assert load(tmp_path / kind / "ckpt.pt")["arch"]["encoder"] == kind
        os.remove(torch_home / "checkpoints" / files[kind])
        run(
            tmp_path / f"{kind}_eval",
            "--encoder",
            kind,
            "--eval-only",
            "--ckpt",
            str(tmp_path / kind / "ckpt_best.pt"),
        )
        m2 = json.loads((tmp_path / f"{kind}_eval" / "metrics.json").read_text())
        assert m2["eval"]["psnr"] == pytest.approx(m["eval"]["psnr"], rel=1e-6)
        run(tmp_path / kind, "--encoder", kind, "--steps", "3", "--accept-changed-args")
        assert load(tmp_path / kind / "ckpt.pt")["step"] == 3
        with pytest.raises(SystemExit, match=f"error: no {kind} weights at .*checkpoints"):
            run(tmp_path / f"{kind}_new", "--encoder", kind)


def test_old_checkpoint_without_an_encoder_is_conv(tmp_path):
    """A checkpoint from before --encoder (no 'encoder' in its arch) evaluates as conv and is
    refused for another encoder by name."""
    run(tmp_path / "conv", "--steps", "2")
    ck = load(tmp_path / "conv" / "ckpt.pt")
    del ck["arch"]["encoder"]
    torch.save(ck, tmp_path / "old.pt")
    run(tmp_path / "eval", "--eval-only", "--ckpt", str(tmp_path / "old.pt"))
    assert (tmp_path / "eval" / "metrics.json").exists()
    with pytest.raises(SystemExit, match="trained with --encoder conv, not dinov2"):
        run(
            tmp_path / "eval",
            "--eval-only",
            "--ckpt",
            str(tmp_path / "old.pt"),
            "--encoder",
            "dinov2",
        )


# ----------------------------------------------------------------------------- bad input
def missing_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision: ImportError


@pytest.mark.parametrize(
    "flags, message, setup",
    [
        (["--encoder", "vit"], "error: unknown --encoder 'vit'; use one of conv, vqvae:DIR", None),
        (["--finetune-encoder"], "error: --finetune-encoder trains a pretrained encoder", None),
        (
            ["--encoder-weights", "w.pth"],
            "error: --encoder-weights applies to --encoder resnet18",
            None,
        ),
        (["--encoder", "vqvae:"], "error: --encoder vqvae:DIR needs the folder", None),
        (
            ["--encoder", "vqvae:/nonexistent"],
            "error: no first stage in /nonexistent .*make one with `python train_vqvae.py "
            "--data bouncing_balls --resolution 32",
            None,
        ),
        (
            ["--encoder", "resnet18"],
            "error: --encoder resnet18 needs torchvision \\(ModuleNotFoundError",
            missing_torchvision,
        ),
        (
            ["--encoder", "resnet18"],
            "error: no resnet18 weights at .*resnet18-f37072fd.pth; on a machine with "
            "internet, .*IMAGENET1K_V1",
            install_torchvision,
        ),
        (
            ["--encoder", "dinov2"],
            "error: no DINOv2 at .*facebookresearch_dinov2_main .*"
            "torch.hub.load\\('facebookresearch/dinov2', 'dinov2_vits14'\\)",
            None,
        ),
        (
            ["--encoder", "dinov2", "--encoder-weights", "/nonexistent.pt"],
            "error: no DINOv2 at /nonexistent.pt",
            None,
        ),
    ],
)
def test_bad_encoder_input_one_line(tmp_path, monkeypatch, flags, message, setup):
    if setup is missing_torchvision:
        missing_torchvision(monkeypatch)
    elif setup is install_torchvision:
        install_torchvision(monkeypatch, [])
    with pytest.raises(SystemExit, match=message) as e:
        run(tmp_path, *flags)
    assert "\n" not in str(e.value.code)
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "args.json").exists()


def test_bad_first_stage_flags_one_line(first_stage, tmp_path):
    """An exported program cannot be fine-tuned, has a fixed frame size and latent grid."""
    enc = ["--encoder", f"vqvae:{first_stage}"]
    cases = [
        (
            ["--finetune-encoder"],
            "cannot train --encoder vqvae:DIR: its encoder is an exported program",
        ),
        (
            ["--latent-grid", "8"],
            "gives the first stage's latent grid, --resolution 32 / 8; drop --latent-grid 8",
        ),
        (
            ["--resolution", "64"],
            "takes 3-channel 32 px frames, .* gives 3-channel 64 px ones; pass --resolution 32",
        ),
        (
            ["--data", "moving_mnist"],
            "takes 3-channel 32 px frames, --data moving_mnist .* gives 1-channel",
        ),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit, match="error: .*" + message) as e:
            run(tmp_path, *enc, *flags)
        assert "\n" not in str(e.value.code)
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "args.json").exists()


def test_resnet18_with_the_real_torchvision():
    """Where torchvision is installed: the stand-in's state-dict names are torchvision's, and the
    encoder gives 128 channels at stride 8 (random weights, no download)."""
    torchvision = pytest.importorskip("torchvision")
    names = set(torchvision.models.resnet18(weights=None).state_dict())
    assert set(TinyResNet18().state_dict()) == names
    bb = wm.resnet18_backbone(None, 8, pretrained=False, trainable=False)
    assert bb(torch.rand(1, 3, 64, 64)).shape == (1, 128, 8, 8)
