"""Single-line breaks of train_world_model.py's method; each must fail a test of
tests/test_train_world_model.py or tests/test_world_model_encoders.py (run: python
tests/mutants/run.py train_world_model; the encoders' alone: ... -k encoder_)."""

TESTS = ["tests/test_world_model_encoders.py", "tests/test_train_world_model.py"]

MUTANTS = [
    {
        "name": "rollout_teacher_forced",
        "invariant": "the rollout feeds its own predicted latent back, not an encoded frame",
        "old": "            z, state = self.dynamics(z, state)",
        "new": "            z, state = self.dynamics(z_context[:, -1], state)",
    },
    {
        "name": "rollout_state_dropped",
        "invariant": "the recurrent state is carried across the context steps",
        "old": "            z, state = self.dynamics(z_context[:, t], state)",
        "new": "            z, state = self.dynamics(z_context[:, t], None)",
    },
    {
        "name": "pred_term_off_by_one",
        "invariant": "the prediction term scores exactly the first k frames after the context",
        "old": "    target = x[:, c : c + k]",
        "new": "    target = x[:, c + 1 : c + k + 1]",
    },
    {
        "name": "pred_term_last_k_of_rollout",
        "invariant": "the prediction term scores the FIRST k predicted frames of a longer rollout",
        "old": "x[:, :c], target, rec, pred[:, :k], args.recon_loss",
        "new": "x[:, :c], target, rec, pred[:, -k:], args.recon_loss",
    },
    {
        "name": "context_split_off_by_one",
        "invariant": "the model sees exactly --context frames and predicts the frames after them",
        "old": "    c = args.context\n    with amp:",
        "new": "    c = args.context - 1\n    with amp:",
    },
    {
        "name": "batch_window_one_short",
        "invariant": "a batch is --context + --horizon consecutive frames of one clip",
        "old": "    span = args.context + args.horizon\n    i = torch.randint",
        "new": "    span = args.context + args.horizon - 1\n    i = torch.randint",
    },
    {
        "name": "batch_last_start_never_drawn",
        "invariant": "window starts are uniform over every valid start, the last included",
        "old": "s = torch.randint(pool.shape[1] - span + 1,",
        "new": "s = torch.randint(pool.shape[1] - span,",
    },
    {
        "name": "gdl_weight_on_temporal_term",
        "invariant": "--gdl-weight scales the GDL term and --temporal-weight the temporal term",
        "old": "l_pred + gdl_weight * l_gdl + temporal_weight * l_tmp",
        "new": "l_pred + gdl_weight * l_tmp + temporal_weight * l_gdl",
    },
    {
        "name": "gdl_on_predictions_only",
        "invariant": "the GDL covers the reconstructed context and the predicted frames",
        "old": "l_gdl = gradient_difference_loss(torch.cat([rec, pred], 1), torch.cat([context, "
        "target], 1))",
        "new": "l_gdl = gradient_difference_loss(pred, target)",
    },
    {
        "name": "gdl_one_axis_twice",
        "invariant": "GDL = x-gradient part + y-gradient part",
        "old": "    for d in (-1, -2):",
        "new": "    for d in (-1, -1):",
    },
    {
        "name": "temporal_l1",
        "invariant": "temporal term = MSE between predicted and true frame differences",
        "old": "return F.mse_loss(pred.diff(dim=1), target.diff(dim=1))",
        "new": "return F.l1_loss(pred.diff(dim=1), target.diff(dim=1))",
    },
    {
        "name": "temporal_anchor_true_frame",
        "invariant": "the first predicted difference is taken from the RECONSTRUCTED last context "
        "frame",
        "old": "torch.cat([rec[:, -1:], pred], 1)",
        "new": "torch.cat([context[:, -1:], pred], 1)",
    },
    {
        "name": "gru_gate_flipped",
        "invariant": "ConvGRU: h' = u h + (1 - u) tanh(candidate)",
        "old": "h = u * h + (1 - u) * torch.tanh(",
        "new": "h = (1 - u) * h + u * torch.tanh(",
    },
    {
        "name": "lstm_forget_input_swapped",
        "invariant": "ConvLSTM: c' = sigmoid(f) c + sigmoid(i) tanh(g)",
        "old": "c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)",
        "new": "c = torch.sigmoid(i) * c + torch.sigmoid(f) * torch.tanh(g)",
    },
    {
        "name": "causal_age_reversed",
        "invariant": "transformer temporal order: the newest cached frame has age 0 (the causal "
        "ALiBi bias, not transposed)",
        "old": "age = torch.arange(len(cache) - 1, -1, -1, device=x.device)",
        "new": "age = torch.arange(len(cache), device=x.device)",
    },
    {
        "name": "window_keeps_oldest",
        "invariant": "the transformer attends to the LAST --context frames (window)",
        "old": "cache = (cache + [(k, v)])[-window:]",
        "new": "cache = (cache + [(k, v)])[:window]",
    },
    {
        "name": "curriculum_never_grows",
        "invariant": "the training loop's rollout length follows rollout_len(step)",
        "old": "            k = rollout_len(step, args)",
        "new": "            k = rollout_len(0, args)",
    },
    {
        "name": "curriculum_step_not_shifted",
        "invariant": "rollout_len = ceil(horizon (step + 1) / ramp), clipped to 1..horizon",
        "old": "math.ceil(args.horizon * (step + 1) / ramp)",
        "new": "math.ceil(args.horizon * step / ramp)",
    },
    {
        "name": "copy_last_from_first_context_frame",
        "invariant": "copy-last repeats the LAST context frame, scored on the model's frames",
        "old": "    truth = clips[:, c - 1 :].float() / 255",
        "new": "    truth = torch.cat([clips[:, :1], clips[:, c:]], 1).float() / 255",
    },
    {
        "name": "val_loss_over_whole_rollout",
        "invariant": "the validation loss covers the first --horizon predicted frames only",
        "old": "    h = min(args.horizon, steps)",
        "new": "    h = steps",
    },
    {
        "name": "rollout_detached",
        "invariant": "the loss backpropagates through the fed-back predicted latents",
        "old": "            z, state = self.dynamics(z, state)",
        "new": "            z, state = self.dynamics(z.detach(), state)",
    },
    {
        "name": "alibi_sign_flipped",
        "invariant": "ALiBi: older frames get a lower attention bias (-slope * age)",
        "old": "bias = -slopes.view(-1, 1, 1) * age.to(slopes.dtype)",
        "new": "bias = slopes.view(-1, 1, 1) * age.to(slopes.dtype)",
    },
    {
        "name": "space_offset_transposed",
        "invariant": "the spatial bias is indexed by (query cell - key cell), not its transpose",
        "old": "offset = (y[:, None] - y[None] + grid - 1)",
        "new": "offset = (y[None] - y[:, None] + grid - 1)",
    },
    {
        "name": "encoder_imagenet_mean_std_swapped",
        "invariant": "pretrained ImageNet networks see (x - mean) / std",
        "old": "            x = (x - self.mean) / self.std",
        "new": "            x = (x - self.std) / self.mean",
    },
    {
        "name": "encoder_features_not_normalised",
        "invariant": "a first stage's latents are normalised by its statistics",
        "old": "        return (f.float() - self.shift) / self.scale",
        "new": "        return f.float()",
    },
    {
        "name": "encoder_tokens_column_major",
        "invariant": "patch tokens are laid out on the grid row by row",
        "old": "            f = f.transpose(1, 2).unflatten(2, (g, g))",
        "new": "            f = f.transpose(1, 2).unflatten(2, (g, g)).transpose(2, 3)",
    },
    {
        "name": "encoder_frozen_keeps_graph",
        "invariant": "a frozen encoder runs without autograd",
        "old": "with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):",
        "new": "with torch.set_grad_enabled(torch.is_grad_enabled()):",
    },
    {
        "name": "encoder_frozen_weights_require_grad",
        "invariant": "frozen weights require no gradient and stay out of the optimiser",
        "old": "            p.requires_grad_(trainable)",
        "new": "            p.requires_grad_(True)",
    },
    {
        "name": "encoder_optimizer_takes_frozen_weights",
        "invariant": "the optimiser holds the trainable weights only",
        "old": "        [p for p in raw.parameters() if p.requires_grad],",
        "new": "        list(raw.parameters()),",
    },
    {
        "name": "encoder_batchnorm_trains",
        "invariant": "the pretrained network stays in eval mode (BatchNorm statistics unchanged)",
        "old": "        return self  # see the class docstring",
        "new": "        return super().train(mode)  # see the class docstring",
    },
    {
        "name": "encoder_finetune_gradient_blocked",
        "invariant": "--finetune-encoder: the loss's gradient reaches the pretrained network",
        "old": "        return self.encoder(self.backbone(x))",
        "new": "        return self.encoder(self.backbone(x).detach())",
    },
    {
        "name": "encoder_resnet18_stride_16",
        "invariant": "ResNet-18's features are those of layer2 (stride 8)",
        "old": 'names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2")',
        "new": 'names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")',
    },
    {
        "name": "encoder_resnet18_weights_not_loaded",
        "invariant": "ResNet-18 gets the weights of its state-dict file",
        "old": '        read_weights(path, "resnet18", net)',
        "new": '        read_weights(path, "resnet18", torchvision.models.resnet18(weights=None))',
    },
    {
        "name": "encoder_dinov2_not_14_per_cell",
        "invariant": "DINOv2's frames are resized to 14 px per latent cell",
        "old": "    size = 14 * grid",
        "new": "    size = 16 * grid",
    },
    {
        "name": "encoder_dinov2_mask_token_trains",
        "invariant": "DINOv2's mask token (never reached) gets no gradient under fine-tuning",
        "old": "        mask.requires_grad_(False)",
        "new": "        mask.requires_grad_(True)",
    },
    {
        "name": "encoder_checkpoint_encoder_not_checked",
        "invariant": "a checkpoint of another --encoder is refused by name",
        "old": '    if saved != arch["encoder"]:',
        "new": "    if False:",
    },
    {
        "name": "encoder_old_checkpoint_not_conv",
        "invariant": "a checkpoint without an encoder in its arch has the conv encoder",
        "old": 'saved = ckpt.get("arch", {}).get("encoder", "conv")',
        "new": 'saved = ckpt.get("arch", {}).get("encoder")',
    },
    {
        "name": "encoder_pretrained_weights_needed_on_resume",
        "invariant": "resume and --eval-only take the encoder's weights from the checkpoint",
        "old": 'build_backbone(args, arch["channels"], pretrained=ckpt is None)',
        "new": 'build_backbone(args, arch["channels"], pretrained=True)',
    },
    {
        "name": "fresh_batches_shared_by_ranks",
        "invariant": "--fresh: every step and rank draws clips no other step or rank drew",
        "old": "    first = (step * world + rank) * args.batch_size",
        "new": "    first = step * args.batch_size",
    },
    {
        "name": "fresh_batches_not_quantised",
        "invariant": "--fresh clips have the pool's uint8 precision",
        "old": "    clips = (clips.clamp(0, 1) * 255).round() / 255",
        "new": "    clips = clips.clamp(0, 1)",
    },
    {
        "name": "encoder_grid_off",
        "invariant": "the encoder halves the frame `down` times (latent grid resolution / 2^down)",
        "old": '            ResBlock(c2, c3, "down" if down > 2 else None),',
        "new": '            ResBlock(c2, c3, "down" if down > 1 else None),',
    },
    {
        "name": "latent_grid_flag_ignored",
        "invariant": "--latent-grid sets the encoder's halvings",
        "old": "        down=round(math.log2(args.resolution // latent_grid(args))),",
        "new": "        down=3,",
    },
    {
        "name": "figures_of_last_weights",
        "invariant": "metrics.json holds the figures of the weights best on val (ckpt_best.pt)",
        "old": '        raw.load_state_dict(ckpt["model"])\n        selected',
        "new": "        selected",
    },
    {
        "name": "figures_on_val_clips",
        "invariant": "metrics.json's figures come from test clips",
        "old": '    return load_clips(source, args.test_clips, args.context + eval_rollout(args), "test")',
        "new": '    return load_clips(source, args.test_clips, args.context + eval_rollout(args), "val")',
    },
    {
        "name": "copy_last_of_the_first_target",
        "invariant": "copy_last repeats the last context frame",
        "old": "        torch.cat(preds), truth[:, :1], truth[:, 1:], args.horizon",
        "new": "        torch.cat(preds), truth[:, 1:2], truth[:, 1:], args.horizon",
    },
    {
        "name": "errors_on_clamped_rollout",
        "invariant": "the rollout's errors are scored on its raw output",
        "old": "        preds.append(pred.float().cpu())",
        "new": "        preds.append(pred.float().clamp(0, 1).cpu())",
    },
]
