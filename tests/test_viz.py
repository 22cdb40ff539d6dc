import io

import numpy as np
import pytest
import torch
from PIL import Image

import viz


def moving_square(t=8, size=16, channels=3, value=1.0):
    v = torch.zeros(t, channels, size, size)
    for i in range(t):
        x = (2 * i) % (size - 4)
        v[i, :, 4:8, x : x + 4] = value
    return v


def rand_video(t=6, c=3, h=16, w=20, seed=0):
    return torch.rand(t, c, h, w, generator=torch.Generator().manual_seed(seed))


def count_color(frame, color):
    return int((frame == np.array(color, np.uint8)).all(-1).sum())


def test_to_uint8_rounds_clips_and_moves_channels():
    x = torch.tensor([-1.0, 0.0, 0.25, 0.2, 0.999, 1.0, 2.0]).view(1, 1, 1, 7)
    u = viz.to_uint8(x)
    assert u.dtype == np.uint8 and u.shape == (1, 1, 7, 1)
    assert u.ravel().tolist() == [0, 0, 64, 51, 255, 255, 255]
    v = rand_video()
    assert viz.to_uint8(v).shape == (6, 16, 20, 3)
    np.testing.assert_array_equal(viz.to_uint8(v), viz.to_uint8(v.numpy()))
    assert viz.to_uint8(torch.rand(2, 6, 1, 8, 8)).shape == (2, 6, 8, 8, 1)


def test_gif_frame_count_size_and_timing(tmp_path):
    path = viz.create_video_gif(rand_video(t=7), tmp_path / "a.gif", fps=10)
    with Image.open(path) as im:
        assert im.n_frames == 7
        assert im.size == (20, 16)
        assert im.info["duration"] == 100 and im.info["loop"] == 0
    # gif_bytes of a single video is the same animation, in memory
    with Image.open(io.BytesIO(viz.gif_bytes(rand_video(t=5), fps=4))) as im:
        assert im.n_frames == 5


def test_grid_sizes_grow_with_videos_and_captions(tmp_path):
    batch = torch.stack([rand_video(t=4, h=32, w=32, seed=i) for i in range(4)])
    areas, heights = [], []
    for n in (1, 2, 4):
        prompts = [f"a video with a fairly long caption number {i}" for i in range(n)]
        g = viz.save_video_grid(batch[:n], tmp_path / f"g{n}.gif", prompts=prompts)
        with Image.open(tmp_path / f"g{n}.gif") as im:
            assert im.n_frames == 4 and im.size == (g.shape[2], g.shape[1])
            areas.append(im.size[0] * im.size[1])
        viz.save_video_grid(batch[:n], tmp_path / f"g{n}.png", prompts=prompts)
        with Image.open(tmp_path / f"g{n}.png") as im:
            heights.append(im.size[1])
    assert areas[0] < areas[1] < areas[2]
    assert heights[0] < heights[1] < heights[2]
    # 32x32 videos are blown up so a caption fits; captions add height under each cell
    bare = viz.save_video_grid(batch[:1], tmp_path / "bare.gif")
    captioned = viz.save_video_grid(batch[:1], tmp_path / "c.gif", prompts=["hi"])
    assert bare.shape[2] >= 96 and bare.shape[1] < captioned.shape[1]


def test_grid_holds_last_frame_of_shorter_video(tmp_path):
    g = viz.save_video_grid([rand_video(t=3), rand_video(t=6, seed=1)], tmp_path / "g.gif", scale=1)
    assert g.shape[0] == 6
    np.testing.assert_array_equal(g[2, 4 : 4 + 16, 4 : 4 + 20], g[5, 4 : 4 + 16, 4 : 4 + 20])


def test_comparison_marks_context_and_predicted_frames(tmp_path):
    truth = moving_square()
    pred = truth.flip(-1)
    f = viz.create_video_comparison(
        {"truth": truth, "prediction": pred}, tmp_path / "c.gif", context_frames=3
    )
    assert f.shape[0] == 8
    assert (
        count_color(f[0], viz.CONTEXT_COLOR) > 100 and count_color(f[0], viz.PREDICTED_COLOR) == 0
    )
    assert (
        count_color(f[7], viz.PREDICTED_COLOR) > 100 and count_color(f[7], viz.CONTEXT_COLOR) == 0
    )
    with Image.open(tmp_path / "c.gif") as im:
        assert im.n_frames == 8
    strip = viz.create_video_comparison(
        {"truth": truth, "prediction": pred}, tmp_path / "c.png", context_frames=3
    )
    png = np.asarray(Image.open(tmp_path / "c.png").convert("RGB"))
    np.testing.assert_array_equal(png, strip[0])
    # 3 rows of framed frames (truth, prediction, |error|): 3 context columns, 5 predicted
    ratio = count_color(png, viz.PREDICTED_COLOR) / count_color(png, viz.CONTEXT_COLOR)
    assert 5 / 3 * 0.8 < ratio < 5 / 3 * 1.2


def test_error_panel_zero_for_identical_and_lit_for_different(tmp_path):
    truth = torch.ones(4, 3, 10, 12)
    same = viz.create_video_comparison([truth, truth.clone()], tmp_path / "s.gif", scale=1)
    # nothing else in the picture is pure black: background, text and frames are not
    assert all(count_color(fr, (0, 0, 0)) == 10 * 12 for fr in same)
    diff = viz.create_video_comparison([truth, truth * 0.5], tmp_path / "d.gif", scale=1)
    assert all(count_color(fr, (0, 0, 0)) == 0 for fr in diff)
    no_err = viz.create_video_comparison([truth, truth], tmp_path / "n.gif", scale=1, error=False)
    assert no_err.shape[2] < same.shape[2]


def test_comparison_mixes_grey_and_rgb_and_pads_shorter(tmp_path):
    grey = moving_square(t=8, channels=1)
    f = viz.create_video_comparison(
        {"context": grey[:3], "truth": grey, "prediction": moving_square(t=8)},
        tmp_path / "m.png",
        context_frames=3,
    )
    assert f.shape[0] == 1
    g = viz.create_video_comparison(
        {"context": grey[:3], "truth": grey, "prediction": moving_square(t=8)},
        tmp_path / "m.gif",
        context_frames=3,
    )
    assert g.shape[0] == 8
    # |error| between grey and RGB white squares is zero: same picture
    assert count_color(g[0], (0, 0, 0)) > 0


def test_mp4_round_trip(tmp_path):
    imageio = pytest.importorskip("imageio.v2")
    pytest.importorskip("imageio_ffmpeg")
    ramp = torch.linspace(0, 1, 33).view(1, 1, 1, 33).expand(9, 3, 31, 33)
    path = viz.save_mp4(ramp, tmp_path / "a.mp4", fps=8)
    with imageio.get_reader(path) as r:
        frames = [f for f in r]
    assert len(frames) == 9
    assert frames[0].shape == (32, 34, 3)  # odd sizes padded to even
    assert np.abs(frames[4][:31, :33].astype(float) - viz.to_uint8(ramp[4])).mean() < 8


def test_latent_to_rgb_range_shape_and_main_component():
    g = torch.Generator().manual_seed(0)
    field = torch.rand(3, 1, 8, 8, generator=g)
    direction = torch.randn(16, generator=g)
    z = 5 * field * (direction / direction.norm()).view(1, 16, 1, 1) + 0.05 * torch.randn(
        3, 16, 8, 8, generator=g
    )
    rgb = viz.latent_to_rgb(z)
    assert rgb.shape == (3, 3, 8, 8)
    assert float(rgb.min()) == 0.0 and float(rgb.max()) == 1.0
    r = rgb[:, 0].flatten().numpy()
    assert abs(np.corrcoef(r, field.flatten().numpy())[0, 1]) > 0.99
    assert viz.latent_to_rgb(z[0]).shape == (3, 8, 8)
    two = viz.latent_to_rgb(torch.randn(2, 4, 4, generator=g))
    assert float(two[2].abs().max()) == 0.0 and float(two[0].max()) == 1.0


def test_save_latent_picture(tmp_path):
    z = torch.randn(2, 8, 4, 4)
    viz.save_latent_picture(z, tmp_path / "z.png", upscale=4, title=None)
    viz.save_latent_picture(z, tmp_path / "titled.png", upscale=4)
    with Image.open(tmp_path / "z.png") as im, Image.open(tmp_path / "titled.png") as titled:
        assert im.size == (2 * 16 + 2, 16)
        assert titled.size[0] == im.size[0] and titled.size[1] > im.size[1] + 10
        picture = np.asarray(titled)[-16:]  # the title sits above an unchanged picture
        assert np.array_equal(picture, np.asarray(im))


def test_plots_write_png(tmp_path):
    plotter = viz.TrainingPlotter()
    for step in range(30):
        plotter.log(step, loss=1.0 / (step + 1), lr=torch.tensor(1e-3))
    curves = plotter.save(tmp_path / "curves.png")
    assert sorted(curves) == ["loss", "lr"] and len(curves["loss"][0]) == 30
    viz.plot_metric_vs_horizon(
        {
            "a": [30.0, 28.0, 25.0],
            "b": (np.array([29.0, 26, 24]), np.ones(3)),
            "c": torch.rand(5, 3) + 20,
        },
        tmp_path / "h.png",
        context=2,
        train_horizon=2,
    )
    for name in ("curves.png", "h.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
        assert (tmp_path / name).stat().st_size > 5000


def test_plot_training_curves_reads_event_files(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path / "run") as w:
        for step in range(0, 50, 10):
            w.add_scalar("train/loss", 1.0 / (step + 1), step)
            w.add_scalar("eval/psnr", 20.0 + step, step)
        w.add_scalar("perf/speed", 3.0, 40)  # logged once: a value, not a curve
    curves = viz.plot_training_curves(tmp_path / "run", tmp_path / "run" / "plots" / "c.png")
    assert sorted(curves) == ["eval/psnr", "train/loss"]
    assert list(curves["eval/psnr"][0]) == [0, 10, 20, 30, 40]
    np.testing.assert_allclose(curves["eval/psnr"][1], [20, 30, 40, 50, 60])
    assert (tmp_path / "run" / "plots" / "c.png").stat().st_size > 5000


def test_log_video_writes_animated_gif_summary(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path) as w:
        viz.log_video(
            w,
            "samples/pred",
            torch.stack([rand_video(t=5, seed=i) for i in range(2)]),
            step=7,
            fps=5,
        )
    ea = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    ea.Reload()
    (ev,) = ea.Images("samples/pred")
    assert ev.step == 7
    with Image.open(io.BytesIO(ev.encoded_image_string)) as im:
        assert im.format == "GIF" and im.n_frames == 5
        assert im.size == (ev.width, ev.height) and ev.width > 2 * 20


@pytest.mark.parametrize(
    "call",
    [
        lambda p: viz.to_uint8(torch.rand(8, 8)),
        lambda p: viz.create_video_gif(torch.rand(4, 16, 16, 3), p / "a.gif"),  # channels-last
        lambda p: viz.create_video_gif(torch.rand(4, 3, 8, 8), p / "a.jpg"),
        lambda p: viz.save_video_grid(torch.rand(2, 4, 3, 8, 8), p / "a.gif", prompts=["only one"]),
        lambda p: viz.save_video_grid(
            [torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 9)], p / "a.gif"
        ),
        lambda p: viz.create_video_comparison(
            [torch.rand(4, 3, 8, 8), torch.rand(4, 3, 9, 8)], p / "a.gif"
        ),
        lambda p: viz.create_video_comparison(
            [torch.rand(4, 3, 8, 8)], p / "a.gif", labels=["a", "b"]
        ),
        lambda p: viz.plot_metric_vs_horizon({}, p / "h.png"),
        lambda p: viz.plot_metric_vs_horizon({"a": ([1.0, 2.0, 3.0], [0.1, 0.1])}, p / "h.png"),
        lambda p: viz.latent_to_rgb(torch.full((4, 2, 2), float("nan"))),
        lambda p: viz.create_video_gif(torch.rand(4, 3, 8, 8), p / "a.gif", fps=0),
    ],
)
def test_bad_input_one_line_value_error(tmp_path, call):
    with pytest.raises(ValueError) as e:
        call(tmp_path)
    assert "\n" not in str(e.value) and len(str(e.value)) > 10


def test_single_values_are_plotted_when_nothing_else_was_logged(tmp_path):
    plotter = viz.TrainingPlotter()
    plotter.log(0, psnr=20.0, loss=0.5)
    assert sorted(plotter.save(tmp_path / "c.png")) == ["loss", "psnr"]


def test_missing_run_dir_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        viz.plot_training_curves(tmp_path / "nope", tmp_path / "c.png")
    with pytest.raises(ValueError, match="no scalars"):
        viz.TrainingPlotter().save(tmp_path / "c.png")
