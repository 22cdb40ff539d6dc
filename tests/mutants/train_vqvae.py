"""Single-line breaks of train_vqvae.py's method; each must fail a test in tests/test_train_vqvae.py.

Run: python tests/mutants/run.py train_vqvae
"""

MUTANTS = [
    {
        "name": "perplexity_is_entropy",
        "invariant": "perplexity = exp(entropy of the code histogram)",
        "old": '        "loss": rec_loss / len(frames),\n        "codebook_usage": float((p > 0).double().mean()),\n        "perplexity": float(torch.exp(-(p * p.clamp_min(1e-30).log()).sum())),',
        "new": '        "loss": rec_loss / len(frames),\n        "codebook_usage": float((p > 0).double().mean()),\n        "perplexity": float(-(p * p.clamp_min(1e-30).log()).sum()),',
    },
    {
        "name": "usage_wrong_axis",
        "invariant": "codebook usage = used codes / number of codes (K, not D)",
        "old": "p = torch.bincount(idx.flatten(), minlength=model.codebook.shape[0]).double()",
        "new": "p = torch.bincount(idx.flatten(), minlength=model.codebook.shape[1]).double()",
    },
    {
        "name": "beta_ignored",
        "invariant": "commitment loss is weighted by beta",
        "old": "return rec, beta * F.mse_loss(z.float(), zq.float())",
        "new": "return rec, F.mse_loss(z.float(), zq.float())",
    },
    {
        "name": "commit_no_grad_to_encoder",
        "invariant": "commitment gradient 2 beta (z_e - z_q) / N reaches z_e",
        "old": "return rec, beta * F.mse_loss(z.float(), zq.float())",
        "new": "return rec, beta * F.mse_loss(z.detach().float(), zq.float())",
    },
    {
        "name": "codebook_gets_gradient",
        "invariant": "codes move by EMA only: commitment uses sg[e], the codebook has no gradient",
        "old": '        # the codebook is a buffer: it moves by EMA (update_codebook), not by gradients\n        self.register_buffer("codebook", torch.zeros(codebook_size, latent_channels))',
        "new": "        # the codebook is a buffer: it moves by EMA (update_codebook), not by gradients\n        self.codebook = nn.Parameter(torch.zeros(codebook_size, latent_channels))",
    },
    {
        "name": "ema_count_decay_swapped",
        "invariant": "N <- g N + (1-g) n (decay on the old value)",
        "old": "ema_count = decay * ema_count + (1 - decay) * counts",
        "new": "ema_count = (1 - decay) * ema_count + decay * counts",
    },
    {
        "name": "ema_sum_decay_swapped",
        "invariant": "m <- g m + (1-g) sum z (decay on the old value)",
        "old": "ema_sum = decay * ema_sum + (1 - decay) * sums",
        "new": "ema_sum = (1 - decay) * ema_sum + decay * sums",
    },
    {
        "name": "laplace_dropped",
        "invariant": "codes divide by Laplace-smoothed counts (N_k + eps) / (n + K eps) * n",
        "old": "smoothed = (ema_count + eps) / (n + len(ema_count) * eps) * n",
        "new": "smoothed = ema_count",
    },
    {
        "name": "laplace_wrong_norm",
        "invariant": "Laplace smoothing keeps the total count: denominator n + K eps",
        "old": "smoothed = (ema_count + eps) / (n + len(ema_count) * eps) * n",
        "new": "smoothed = (ema_count + eps) / (n + eps) * n",
    },
    {
        "name": "ste_removed",
        "invariant": "straight-through: decoder grads reach the encoder",
        "old": "        # straight-through: decoder grads reach the encoder\n        x_rec = self.decode_latents(z + (zq - z).detach())",
        "new": "        # straight-through: decoder grads reach the encoder\n        x_rec = self.decode_latents(z + (zq - z))",
    },
    {
        "name": "decoder_sees_z",
        "invariant": "the decoder sees the codes z_q, not z_e",
        "old": "        # straight-through: decoder grads reach the encoder\n        x_rec = self.decode_latents(z + (zq - z).detach())",
        "new": "        # straight-through: decoder grads reach the encoder\n        x_rec = self.decode_latents(z)",
    },
    {
        "name": "nearest_argmax",
        "invariant": "nearest code = argmin of the squared distance",
        "old": "return (flat - codebook).pow(2).sum(-1).argmin(-1)",
        "new": "return (flat - codebook).pow(2).sum(-1).argmax(-1)",
    },
    {
        "name": "samples_unpermuted",
        "invariant": "EMA sums use the latent vectors of the cells (B, h, w order, D per row)",
        "old": "flat = z.detach().float().movedim(1, -1).reshape(-1, z.shape[1])",
        "new": "flat = z.detach().float().reshape(-1, z.shape[1])",
    },
    {
        "name": "restarts_never_fire",
        "invariant": "codes below dead_frac * mean usage restart",
        "old": "dead = count < dead_frac * count.mean()",
        "new": "dead = count < dead_frac * count.min()",
    },
    {
        "name": "restarts_most_used",
        "invariant": "only rarely used codes restart, not the most used",
        "old": "dead = count < dead_frac * count.mean()",
        "new": "dead = count > dead_frac * count.mean()",
    },
    {
        "name": "restart_count_not_reset",
        "invariant": "a restarted code gets a mean-sized count (grace period)",
        "old": "count = torch.where(dead, fresh, count)",
        "new": "count = torch.where(dead, count, count)",
    },
    {
        "name": "restart_sum_unscaled",
        "invariant": "a restarted code's EMA sum is code * count, so e = m / N stays put",
        "old": "total = torch.where(dead[:, None], cand * fresh, total)",
        "new": "total = torch.where(dead[:, None], cand, total)",
    },
    {
        "name": "init_count_zero",
        "invariant": "the initial codebook is a fixed point of the EMA (count 1, sum = code)",
        "old": "vq.ema_count.fill_(1.0)",
        "new": "vq.ema_count.fill_(0.0)",
    },
    {
        "name": "gan_weight_inverted",
        "invariant": "adaptive weight = |grad rec| / |grad gan|",
        "old": "return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4).detach()",
        "new": "return (g_gan.norm() / (g_rec.norm() + 1e-4)).clamp(0, 1e4).detach()",
    },
    {
        "name": "hinge_sign",
        "invariant": "D hinge: relu(1 - D(real)) + relu(1 + D(fake))",
        "old": "d_loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()",
        "new": "d_loss = F.relu(1 + real).mean() + F.relu(1 - fake).mean()",
    },
    {
        "name": "generator_sign",
        "invariant": "generator loss = -mean D(x_rec)",
        "old": "g_loss = -disc(x_rec).float().mean()",
        "new": "g_loss = disc(x_rec).float().mean()",
    },
    {
        "name": "decode_skips_quantize",
        "invariant": "RIVER's decode snaps any latent to its nearest code first",
        "old": '        x in [0, 1]."""\n        return self.decode_latents(self.quantize(z)[0]).clamp(0, 1)',
        "new": '        x in [0, 1]."""\n        return self.decode_latents(z).clamp(0, 1)',
    },
    {
        "name": "export_static_batch",
        "invariant": "the exported first stage takes any batch size",
        "old": "program = torch.export.export(Exported(vq, name), (inp,), dynamic_shapes=({0: batch},))",
        "new": "program = torch.export.export(Exported(vq, name), (inp,))",
    },
    {
        "name": "train_step_ema_decay_constant",
        "invariant": "train_step's EMA step uses --ema-decay",
        "old": "raw, z, idx, args.ema_decay, args.ema_eps, args.dead_code_frac, rt.ddp",
        "new": "raw, z, idx, 0.99, args.ema_eps, args.dead_code_frac, rt.ddp",
    },
    {
        "name": "3d_time_padding_centred",
        "invariant": "the 3D encoder pads time in front only: no latent frame sees a later frame",
        "old": "self.pad = (w - w // 2, w // 2, h - h // 2, h // 2, t, 0)",
        "new": "self.pad = (w - w // 2, w // 2, h - h // 2, h // 2, t - t // 2, t // 2)",
    },
    {
        "name": "3d_mask_on_columns",
        "invariant": "axial attention is masked along time (axis 1), not along another axis",
        "old": "a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and axis == 1)",
        "new": "a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and axis == 3)",
    },
    {
        "name": "3d_norm_mixes_frames",
        "invariant": "FrameNorm normalises each frame alone",
        "old": "y = super().forward(x.transpose(1, 2).reshape(B * T, C, H, W))",
        "new": "y = super().forward(x.reshape(B * T, C, H, W))",
    },
    {
        "name": "3d_time_halved_last",
        "invariant": "strided levels halve time first, together with space",
        "old": "return [tuple(2 if i < n else 1 for n in levels) for i in range(max(levels))]",
        "new": "return [tuple(2 if i >= max(levels) - n else 1 for n in levels) for i in range(max(levels))]",
    },
    {
        "name": "latent_statistics_of_val_clips",
        "invariant": "the exported latent statistics come from training clips",
        "old": '    scores = evaluate(raw, load_clips(args, args.eval_clips, "train"), args, rt)[0]',
        "new": '    scores = evaluate(raw, load_clips(args, args.eval_clips, "val"), args, rt)[0]',
    },
    {
        "name": "figures_on_val_clips",
        "invariant": "metrics.json's figures come from test clips",
        "old": '    clips = load_clips(args, args.eval_clips, "test")',
        "new": '    clips = load_clips(args, args.eval_clips, "val")',
    },
]
