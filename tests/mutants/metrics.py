"""Single-line breaks of metrics.py's scores; each must fail a test (tests/mutants/run.py)."""

TESTS = ["tests/test_metrics.py"]

MUTANTS = [
    {
        "name": "err_signed",
        "invariant": "MAE is the mean ABSOLUTE error",
        "old": "return (a - b).abs().pow(power)",
        "new": "return (a - b).pow(power)",
    },
    {
        "name": "mae_squared",
        "invariant": "mae is the per-pixel mean of |error|, not of error^2",
        "old": "return _reduce(_err(pred, target, 1).mean((-3, -2, -1)), per_frame)",
        "new": "return _reduce(_err(pred, target, 2).mean((-3, -2, -1)), per_frame)",
    },
    {
        "name": "mse_frame_sum_over_hw_only",
        "invariant": "the Moving MNIST MSE sums over C, H and W of a frame",
        "old": "return _reduce(_err(pred, target, 2).sum((-3, -2, -1)), per_frame)",
        "new": "return _reduce(_err(pred, target, 2).sum((-2, -1)).mean(-1), per_frame)",
    },
    {
        "name": "psnr_range_not_squared",
        "invariant": "PSNR = 10 log10(L^2 / mse)",
        "old": "10 * torch.log10(data_range**2 / err)",
        "new": "10 * torch.log10(data_range / err)",
    },
    {
        "name": "psnr_of_the_mean_error",
        "invariant": "the PSNR scalar is the mean of per-frame PSNRs",
        "old": "return _reduce(10 * torch.log10(data_range**2 / err), per_frame)",
        "new": "return _reduce(10 * torch.log10(data_range**2 / err.mean().expand_as(err)), "
        "per_frame)",
    },
    {
        "name": "ssim_sigma",
        "invariant": "SSIM's window is a Gaussian of sigma 1.5",
        "old": "def _gaussian_1d(sigma: float = 1.5, radius: int = 5)",
        "new": "def _gaussian_1d(sigma: float = 2.0, radius: int = 5)",
    },
    {
        "name": "ssim_c2",
        "invariant": "C2 = (0.03 L)^2",
        "old": "c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2",
        "new": "c1, c2 = (0.01 * data_range) ** 2, 0.03 * data_range**2",
    },
    {
        "name": "ssim_covariance",
        "invariant": "the cross term is the covariance E[xy] - mu_x mu_y",
        "old": "vx, vy, cxy = mxx - mx * mx, myy - my * my, mxy - mx * my",
        "new": "vx, vy, cxy = mxx - mx * mx, myy - my * my, mxy - mx * mx",
    },
    {
        "name": "ssim_luminance_no_2",
        "invariant": "the luminance term is (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)",
        "old": "s = ((2 * mx * my + c1) * (2 * cxy + c2))",
        "new": "s = ((mx * my + c1) * (2 * cxy + c2))",
    },
    {
        "name": "ssim_channels_grouped_wrong",
        "invariant": "each frame's SSIM is the mean over ITS channels",
        "old": "per = torch.cat(out).reshape(*lead, c).mean(-1)",
        "new": "per = torch.cat(out).reshape(c, *lead).mean(0)",
    },
    {
        "name": "frechet_biased_covariance",
        "invariant": "features are fitted with the unbiased covariance",
        "old": "return f.mean(0), np.cov(f, rowvar=False)",
        "new": "return f.mean(0), np.cov(f, rowvar=False, bias=True)",
    },
    {
        "name": "frechet_trace_term_once",
        "invariant": "Tr(S1 + S2 - 2 (S1 S2)^(1/2))",
        "old": "np.trace(s1) + np.trace(s2) - 2 * tr_sqrt",
        "new": "np.trace(s1) + np.trace(s2) - tr_sqrt",
    },
    {
        "name": "frechet_no_root_of_s1",
        "invariant": "the trace uses the square root of S1",
        "old": "root1 = (v * np.sqrt(_numerical_zero(w))) @ v.T",
        "new": "root1 = (v * _numerical_zero(w)) @ v.T",
    },
    {
        "name": "frechet_mean_term_l1",
        "invariant": "the mean term is the SQUARED distance ||mu1 - mu2||^2",
        "old": "return float(((mu1 - mu2) ** 2).sum()",
        "new": "return float((abs(mu1 - mu2)).sum()",
    },
    {
        "name": "alignment_reads_first_video",
        "invariant": "each prompt is checked against its own video's logits",
        "old": "ok.append(p.labels[a][int(logits[a][i].argmax())] == attrs[a])",
        "new": "ok.append(p.labels[a][int(logits[a][0].argmax())] == attrs[a])",
    },
    {
        "name": "alignment_counts_unnamed",
        "invariant": "attributes a prompt does not name (None) are not counted",
        "old": "if attrs.get(a) is not None:",
        "new": "if a in attrs:",
    },
    {
        "name": "alignment_micro_average",
        "invariant": "the score is the mean over videos of each video's fraction",
        "old": "score = float(np.mean(per_video))",
        "new": "score = float(np.mean([h for a in ATTRS for h in hits[a]]))",
    },
    {
        "name": "copy_last_copies_first",
        "invariant": "copy-last repeats the LAST context frame",
        "old": "return context[:, -1:].expand(",
        "new": "return context[:, :1].expand(",
    },
    {
        "name": "horizon_slices_clips",
        "invariant": "the horizon cuts frames (dim 1), not clips",
        "old": "summary[name] = float(per[:, :horizon].mean())",
        "new": "summary[name] = float(per[:horizon].mean())",
    },
    {
        "name": "rotation_sign_flipped",
        "invariant": "clockwise on screen (y down) is positive",
        "old": "ys - (v * ys).sum((-1, -2), keepdim=True) / mass,",
        "new": "(v * ys).sum((-1, -2), keepdim=True) / mass - ys,",
    },
    {
        "name": "rotation_about_image_centre",
        "invariant": "the k-fold moment is taken about the shape's centroid",
        "old": "xs - (v * xs).sum((-1, -2), keepdim=True) / mass,",
        "new": "xs - xs.mean(),",
    },
    {
        "name": "rotation_wrap_half_turn",
        "invariant": "frame-to-frame changes wrap to +-pi/k (k-fold symmetry)",
        "old": "half = math.pi / folds",
        "new": "half = math.pi / 2",
    },
    {
        "name": "rotation_mean_over_batch",
        "invariant": "one rate per video",
        "old": "- half).mean(1)",
        "new": "- half).mean(1).mean().expand(v.shape[0])",
    },
    {
        "name": "psnr_clamp",
        "invariant": "mse is clamped at 1e-10: identical frames give 100 dB",
        "old": "clamp_min(1e-10)\n    return _reduce(10",
        "new": "clamp_min(1e-6)\n    return _reduce(10",
    },
    {
        "name": "ssim_variance_product",
        "invariant": "the contrast-structure denominator is sigma_x^2 + sigma_y^2 + C2",
        "old": "(vx + vy + c2))",
        "new": "(vx * vy + c2))",
    },
    {
        "name": "frechet_trace_s1_twice",
        "invariant": "Tr(S1) + Tr(S2)",
        "old": "np.trace(s1) + np.trace(s2) - 2",
        "new": "np.trace(s1) + np.trace(s1) - 2",
    },
    {
        "name": "alignment_per_attribute_over_prompts",
        "invariant": "per attribute: the mean over the videos whose prompt names it",
        "old": "sum(h) / len(h)",
        "new": "sum(h) / len(prompts)",
    },
    {
        "name": "ssim_window_not_normalised",
        "invariant": "the Gaussian window sums to 1",
        "old": "return g / g.sum()",
        "new": "return g / g.max()",
    },
    {
        "name": "ssim_openstl_window_5",
        "invariant": "the published tables' SSIM window is 7x7",
        "old": "    box = torch.full((7,), 1 / 7, dtype=torch.float64)",
        "new": "    box = torch.full((5,), 1 / 5, dtype=torch.float64)",
    },
    {
        "name": "ssim_openstl_population_variance",
        "invariant": "the published tables' SSIM uses sample variances (x 49/48)",
        "old": "        var_p = (m[:, 2] - mu_p**2) * 49 / 48",
        "new": "        var_p = m[:, 2] - mu_p**2",
    },
    {
        "name": "ssim_openstl_data_range_1",
        "invariant": "the published tables' SSIM takes float frames to span 2 (C1 = 0.02^2)",
        "old": "    k1, k2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2",
        "new": "    k1, k2 = 0.01**2, 0.03**2",
    },
    {
        "name": "ssim_openstl_covariance_term",
        "invariant": "SSIM's structure term is 2 cov + C2",
        "old": "        num = (2 * mu_p * mu_t + k1) * (2 * cov + k2)",
        "new": "        num = (2 * mu_p * mu_t + k1) * (cov + k2)",
    },
    {
        "name": "errors_on_clamped_output",
        "invariant": "MSE and MAE are taken on the raw output, as the published tables",
        "old": "            p = p if name in UNCLAMPED_SCORES else p.clamp(0, 1)",
        "new": "            p = p.clamp(0, 1)",
    },
    {
        "name": "psnr_on_raw_output",
        "invariant": "PSNR and SSIM are taken on the output clamped to [0, 1]",
        "old": "            p = p if name in UNCLAMPED_SCORES else p.clamp(0, 1)",
        "new": "            p = p",
    },
    {
        "name": "chunk_target_not_advanced",
        "invariant": "each chunk of predictions is scored against its own clips",
        "old": "            parts.append(score(p, target[i : i + chunk], per_frame=True))",
        "new": "            parts.append(score(p, target[: len(p)], per_frame=True))",
    },
    {
        "name": "valid_filter_wrong_diagonal",
        "invariant": "the banded matrix correlates with the kernel (band[i + j, i] = g[j])",
        "old": "            m.diagonal(-j).fill_(g[j])",
        "new": "            m.diagonal(-j).fill_(g[len(g) - 1 - j] + (j == 0) * 1e-3)",
    },
    # ---- fd_probe_windows
    {
        "name": "fd_windows_fake_from_the_start",
        "invariant": "each window of the fake videos is compared with the same window of the real",
        "old": "    return [fd_probe(real[:, s : s + window], fake[:, s : s + window], p) for s in starts]",
        "new": "    return [fd_probe(real[:, s : s + window], fake[:, :window], p) for s in starts]",
    },
    {
        "name": "fd_windows_last_window_dropped",
        "invariant": "windows start every stride frames while the window fits",
        "old": "    starts = range(0, t - window + 1, stride)",
        "new": "    starts = range(0, t - window, stride)",
    },
    {
        "name": "fd_windows_stride_ignored",
        "invariant": "windows start every stride frames",
        "old": "    starts = range(0, t - window + 1, stride)",
        "new": "    starts = range(0, t - window + 1, window)",
    },
    # ---- control_videos (fd_check's controls)
    {
        "name": "frozen_holds_the_last_frame",
        "invariant": "the frozen control repeats each video's first frame",
        "old": '        "frozen": videos[:, :1].expand_as(videos),',
        "new": '        "frozen": videos[:, -1:].expand_as(videos),',
    },
    {
        "name": "shuffled_control_not_shuffled",
        "invariant": "the shuffled control reorders each video's frames",
        "old": '        "shuffled": shuffle_frames(videos, gen),',
        "new": '        "shuffled": videos.clone(),',
    },
    {
        "name": "noise_control_is_grey",
        "invariant": "the noise control is uniform noise in [0, 1]",
        "old": '        "noise": torch.rand(videos.shape, generator=gen),',
        "new": '        "noise": torch.full(videos.shape, 0.5),',
    },
    # ---- rotation_rate
    {
        "name": "rotation_rate_reads_the_ground",
        "invariant": "only the shape's pixels weigh the k-fold moment, not a faint ground",
        "old": "    v = v * (v > 0.5 * v.amax((-1, -2), keepdim=True))  # the shape, not the ground",
        "new": "    v = v * (v > 0.0 * v.amax((-1, -2), keepdim=True))  # the shape, not the ground",
    },
]
