"""What every config key means, for the generated reference (``python -m zvl_ds.config --reference``).

Kept apart from ``config.py`` so the dataclasses stay readable. ``tests/test_config_docs.py`` checks that every key
of ``Config`` has an entry here and that no entry names a key that no longer exists, so the README's table cannot
drift from the code. Each text says what THIS code does with the key; a key accepted only so that ZeroVL or LAVIS
configs load says so ("accepted for ZeroVL configs; unused"). Keys under a mapping of sections are written with a
``<name>`` placeholder (``data.datasets.<name>.shards``).
"""
from __future__ import annotations

from typing import Dict

KEY_HELP: Dict[str, str] = {
    # ---------------------------------------------------------------- top level
    "seed": "Seed of everything random: the initial weights (same on every rank), the data plan, shuffle buffers, "
            "per-sample augmentation, the `debias` dataset draws, mixup draws and the per-step dropout seeds.",
    "device": "`auto`: CUDA when visible, else CPU; `cpu`; `cuda` (an error when no GPU is visible).",
    "precision": "Compute precision of the DeepSpeed engine: `fp32`, `bf16` or `fp16` (fills the DeepSpeed "
                 "config's `bf16`/`fp16` sections). `null`: `fp16` if `dist.fp16` is true, else `fp32`.",
    "evaluate": "Evaluate only: resume as for training (`resume_ckpt_path` / `ckpt.auto_resume`), run the "
                "validation sets once and exit. The training datasets must still resolve.",
    "resume_ckpt_path": "Checkpoint to resume from: a run folder holding a `latest` file, or one of its "
                        "`step_NNNNNNNN` folders. Wins over `ckpt.auto_resume`.",
    "epoch": "Run length in epochs (an epoch = the data plan's steps per epoch) unless `runner.train_steps` or "
             "`data.train_steps` is > 0.",
    "inference": "Accepted for ZeroVL configs; unused.",
    # ---------------------------------------------------------------- data
    "data.exp_name": "Name of the run folder `ckpt.dir/exp_name` (checkpoints, config.yaml, TensorBoard, "
                     "eval_metrics.jsonl); a folder name without `/`.",
    "data.name": "Only `local` is accepted (ZeroVL's data backend name); no effect.",
    "data.train_type": "How steps draw from the training datasets. `shuffle`: every batch is a random mix, each "
                       "dataset in proportion to its size; `sequential`: an epoch runs one dataset after the other; "
                       "`debias`: each step takes its whole batch from one dataset drawn with probability "
                       "proportional to its size (ZeroVL's debiased sampling).",
    "data.train_steps": "ZeroVL's run length: > 0 fixes the number of optimizer steps (`runner.train_steps` wins "
                        "when both are > 0).",
    "data.train_name": "Names of the training datasets (each found via `data.datasets.<name>` or "
                       "`data_path/<name>/`); no name twice.",
    "data.valid_name": "Names of the validation datasets evaluated during training and by tools/evaluate.py.",
    "data.data_path": "Root of the shard writer's layout `data_path/<name>/<split>-NNNNNN.tar`; relative paths in "
                      "`data.datasets.<name>.shards` are looked up here first, then in the working folder.",
    "data.datasets": "Explicit sources by dataset name (a mapping `name -> {shards, size}`); a dataset not listed "
                     "here is read from `data_path/<name>/`.",
    "data.datasets.<name>.shards": "Shard spec of dataset `<name>`: a brace pattern, glob, folder, text file "
                                   "listing shards, tar path or URL (`http(s)://`, `pipe:`); several joined by `::`. "
                                   "`pipe:CMD` runs CMD in a shell, so it is refused inside list files. "
                                   "Empty: use `data_path/<name>/<split>-*.tar`.",
    "data.datasets.<name>.size": "Total samples of dataset `<name>`; `null`: read from `sizes.json` or "
                                 "`*_stats.json` next to the shards. Training needs a size; when given it wins and "
                                 "is spread evenly over the shards unless the size files agree.",
    "data.zeroshot": "Zero-shot classification sets by name, evaluated at the validation interval with "
                     "the validation transforms; logged as `eval/<name>/top1` and `top5`, every image counted once "
                     "over the ranks.",
    "data.zeroshot.<name>.path": "A folder laid out by class (`PATH/<class>/<image>`, class c = the c-th sorted "
                                 "sub-folder) or a `.csv` of `image,label` rows (paths relative to the CSV).",
    "data.zeroshot.<name>.classes": "File of the class names the prompts use, one per line in class order; "
                                    "`null`: the folder names or labels with `_` as a space.",
    "data.zeroshot.<name>.templates": "File of prompt templates, one per line, `{}` for the class name; `null`: "
                                      "ten built-in photo prompts.",
    "data.train_splits": "Split prefixes read for training datasets found under `data_path/<name>/` "
                         "(`<split>-*.tar`); ignored for datasets with an explicit `shards` spec.",
    "data.valid_splits": "Split prefixes read for validation datasets found under `data_path/<name>/`; ignored for "
                         "datasets with an explicit `shards` spec.",
    "data.test_splits": "Accepted for LAVIS configs (`run.test_splits`); unused.",
    "data.batch_size": "GLOBAL contrastive batch per optimizer step, summed over all ranks (as in ZeroVL); must be "
                       "divisible by the world size. Each rank loads `batch_size / world_size` samples a step.",
    "data.batch_size_train": "GLOBAL chunk of the `clip_bsgs` runner (samples per forward, summed over ranks); must "
                             "divide `data.batch_size` and be divisible by the world size. `null`: `batch_size` (one "
                             "chunk). The `clip` runner ignores it.",
    "data.batch_size_val": "GLOBAL evaluation batch, summed over ranks; must be divisible by the world size.",
    "data.num_workers": "DataLoader worker processes per rank (0: load in the main process). Also the number of "
                        "loader roles (`max(1, n)`) of the data plan, so it changes the sample order and a saved "
                        "loader position cannot be resumed with another value.",
    "data.shuffle_buffer": "Samples in the seeded shuffle buffer each loader role passes its stretch of shards "
                           "through (larger: better mixing, more memory). Part of the resumable data plan.",
    "data.enable_valid": "Evaluate the `data.valid_name` sets during training (see `runner.val_interval*`); false "
                         "turns evaluation during training off.",
    "data.single_eval": "Accepted for ZeroVL configs; unused.",
    "data.cuda_eval": "Accepted for ZeroVL configs; unused (evaluation runs on the training device).",
    "data.val_steps": "Accepted for ZeroVL configs; unused (evaluation always covers the whole validation set).",
    "data.max_bad_sample_warnings": "Warnings printed per reason for skipped bad samples before they go quiet; every "
                                    "skip is still counted (TensorBoard `data/skipped_<reason>`).",
    "data.loader_timeout": "Seconds a loader worker may take for one batch before the run fails instead of hanging "
                           "(applies when `num_workers` > 0).",
    # ---------------------------------------------------------------- transforms
    "transforms.train_transforms": "Image transforms for training, in order, from `random_resize_crop`, `autoaug` "
                                   "(torchvision AutoAugment, ImageNet policy), `resize` (square, ignores the aspect "
                                   "ratio), `center_crop`, `normalize` (accepted; normalisation always runs on the "
                                   "device). The last crop/resize sets the image size.",
    "transforms.valid_transforms": "Image transforms for validation and exported models; same names as "
                                   "`train_transforms` (`random_resize_crop`, `autoaug`, `resize`, `center_crop`, "
                                   "`normalize`).",
    "transforms.input_size": "Image side of synthetic inputs (tools/bench.py, tools/verify_exactness.py "
                             "--synthetic), recorded in exported models. The loaders take their size from the "
                             "crop/resize sizes instead.",
    "transforms.resize.size": "Side of the square `resize` transform, in pixels.",
    "transforms.center_crop.size": "Side of the `center_crop` transform, in pixels (zero-padded when the image is "
                                   "smaller).",
    "transforms.random_resize_crop.size": "Output side of `random_resize_crop`, in pixels.",
    "transforms.random_resize_crop.scale": "`[low, high]` fraction of the image area the random crop covers "
                                           "(aspect ratio drawn from [3/4, 4/3]).",
    "transforms.normalize.mean": "Per-channel mean subtracted from images scaled to [0, 1] (on the device, in "
                                 "training, evaluation and exported models).",
    "transforms.normalize.std": "Per-channel standard deviation images are divided by after the mean.",
    "transforms.caption_aug.enable": "ZeroVL's word-piece caption augmentation for training captions.",
    "transforms.caption_aug.select_prob": "Probability that a word piece is selected for augmentation.",
    "transforms.caption_aug.mask_prob": "A selected piece becomes the tokenizer's mask token with this probability.",
    "transforms.caption_aug.random_prob": "A selected piece becomes a random vocabulary piece with this probability.",
    "transforms.caption_aug.delete_prob": "A selected piece is deleted with this probability (the three "
                                          "probabilities sum to at most 1; the rest keeps the piece).",
    "transforms.caption_aug.max_pieces_per_word": "Word-piece continuations beyond this many pieces of one word are "
                                                  "dropped when the caption is rebuilt.",
    # ---------------------------------------------------------------- model
    "model.name": "Only `clip` is accepted (the dual encoder); no effect.",
    "model.arch": "A preset from the model presets table; its values fill `model.*`, and keys given explicitly in "
                  "`model:` override them. `null`: no preset.",
    "model.max_length": "Tokens per caption: captions are padded and truncated to this length.",
    "model.image_encoder.name": "Only `timm_modelzoo` is accepted (the image tower is a timm model); no effect.",
    "model.image_encoder.tag": "timm model name, built with `num_classes=0` (pooled features, no classifier).",
    "model.image_encoder.embedding_dim": "Informational; the tower's real feature width is read from the model.",
    "model.image_encoder.pretrained": "`true`: timm's default weights, only if already in the local cache (nothing "
                                      "is downloaded); `false`: random initialisation; a path: a local weights file "
                                      "(safetensors or a weights-only torch file).",
    "model.image_encoder.trainable": "`false` freezes the image tower: no gradients, kept in eval mode "
                                     "(LiT-style).",
    "model.image_encoder.img_size": "`img_size` passed to timm (a ViT's position-embedding grid; pretrained ones "
                                    "are resampled); must match the transforms' output size. `null`: the model's "
                                    "default.",
    "model.image_encoder.grad_checkpointing": "Activation checkpointing in the timm tower (an error if the model "
                                              "does not support it): less memory, more compute.",
    "model.image_encoder.kwargs": "Extra `timm.create_model` arguments, e.g. `{depth: 2, embed_dim: 64}`.",
    "model.image_encoder.vit.only_cls_token": "For a tower that returns a token sequence (timm `global_pool: ''`): "
                                              "`true` takes token 0, `false` the mean of the tokens. Towers that "
                                              "pool themselves are not affected.",
    "model.text_encoder.name": "Only `huggingface_modelzoo` is accepted (a transformers `AutoModel`); no effect.",
    "model.text_encoder.tag": "Hugging Face model name already in the local cache, or a local folder; also the "
                              "tokenizer when `tokenizer` is null. Nothing is downloaded.",
    "model.text_encoder.embedding_dim": "Informational; the tower's real hidden width is read from the model.",
    "model.text_encoder.pretrained": "`true`: load the weights of `tag`; a string: load this local folder (or "
                                     "cached name) instead; `false`: random weights built from `config` (or the "
                                     "tag's cached config).",
    "model.text_encoder.trainable": "`false` freezes the text tower: no gradients, kept in eval mode.",
    "model.text_encoder.target_token_idx": "Position of the token whose last hidden state is the text feature when "
                                           "`pooling` is `cls`.",
    "model.text_encoder.only_cls_token": "Accepted for ZeroVL configs; unused (see `pooling` and "
                                         "`target_token_idx`).",
    "model.text_encoder.pooling": "Text feature: `cls` = the hidden state at `target_token_idx`; `mean` = the "
                                  "attention-masked mean of the last hidden states.",
    "model.text_encoder.grad_checkpointing": "Activation checkpointing in the text tower (non-reentrant, replays "
                                             "dropout exactly); an error if the model does not support it.",
    "model.text_encoder.tokenizer": "Tokenizer folder or cached name; `zvl_ds:demo_tokenizer` = the packaged demo "
                                    "vocabulary; `null`: the folder `pretrained` names, else `tag`.",
    "model.text_encoder.config": "Hugging Face config fields. With `model_type` (and `pretrained: false`) the "
                                 "tower is built from them alone; otherwise they override the loaded config.",
    "model.projection.name": "`simple`: one bias-free Linear per tower (ZeroVL); `mlp`: Linear, GELU, bias-free "
                             "Linear.",
    "model.projection.dim": "Width of the shared embedding space both projections map to.",
    "model.projection.image_projector_trainable": "`false` freezes the image projection.",
    "model.projection.text_projector_trainable": "`false` freezes the text projection.",
    "model.pool.name": "Only `identity` is accepted (ZeroVL's pooling option); no effect.",
    "model.syncbn": "Accepted for ZeroVL configs; unused (the towers have no BatchNorm to convert).",
    "model.interpolate_pos_embed": "Accepted for ZeroVL configs; unused (timm resamples position embeddings itself "
                                   "when a weights file's grid differs from `img_size`).",
    "model.compile": "`torch.compile` each tower with this mode (`default`, `reduce-overhead`, `max-autotune`); "
                     "`none`: eager. Faster steps after a compile on the first ones; needs a C++ compiler on CPU.",
    "model.attention": "`sdpa`: both towers use fused `scaled_dot_product_attention` (flash/memory-efficient "
                       "kernels on GPUs); `eager`: the plain matmul-softmax attention (a reference for debugging).",
    # ---------------------------------------------------------------- loss
    "loss.name": "`NCE`: symmetric InfoNCE over the global batch; `MixUpNCE`: ZeroVL's coin-flip mixup (each step "
                 "mixes either images or texts with a partner, soft targets); `SigLIP`: the pairwise sigmoid loss "
                 "(see Choosing a loss).",
    "loss.global_reduce": "Accepted for ZeroVL configs; unused (the loss is always over the global batch).",
    "loss.group_size": "Accepted for ZeroVL configs; only -1 (gather over the whole world) is implemented, another "
                       "value is an error.",
    "loss.smoothing": "Accepted for ZeroVL configs; only 0.0 is implemented (no label smoothing), another value is "
                      "an error.",
    "loss.nce_loss.gather_backward": "`clip` runner only. `true`: gradients flow back through the gathered "
                                     "embeddings (the exact full-batch gradient); `false`: ZeroVL's plain gather "
                                     "(gathered embeddings are constants). `clip_bsgs` is always exact.",
    "loss.temperature.name": "`constant`: a fixed tau; `parameter`: a learnable tau (the model parameter "
                             "`tau`, saved with the weights).",
    "loss.temperature.value": "tau (fixed, or the learnable one's initial value); the logits are DIVIDED by it.",
    "loss.temperature.min": "Lower clamp of tau at every use (need 0 < min <= value <= max).",
    "loss.temperature.max": "Upper clamp of tau at every use.",
    "loss.mixup.beta": "`MixUpNCE` only: lambda ~ Beta(beta, beta), drawn once per step from `(seed, step)`; must "
                       "be > 0.",
    "loss.chunk_rows": "Rows of the logits matrix computed at once (memory knob); the result is exact whatever "
                       "the value.",
    "loss.chunk_cols": "Columns of a logits tile: > 0 holds chunk_rows x chunk_cols logits whatever the batch "
                       "(online log-sum-exp, one extra matmul); 0: whole rows (chunk_rows x B).",
    "loss.sigmoid.scale_init": "`SigLIP` only: initial scale t multiplying the similarities (learned as log t, "
                               "parameter `logit_scale_log`); must be > 0.",
    "loss.sigmoid.bias_init": "`SigLIP` only: initial bias b added to every logit (parameter `logit_bias`).",
    # ---------------------------------------------------------------- optim
    "optim.name": "`torch.optim.AdamW` or `AdamW`: AdamW; `torch.optim.SGD` or `SGD`: SGD.",
    "optim.param.betas": "AdamW betas `[beta1, beta2]`.",
    "optim.param.eps": "AdamW epsilon.",
    "optim.param.weight_decay": "Weight decay of the decay group (all parameters when `decay_all`).",
    "optim.param.momentum": "SGD momentum (SGD only).",
    "optim.lr.name": "`cosine_schedule_with_warmup_min_lr_scale` (ZeroVL): linear ramp from 0, then cosine down "
                     "to `init * min_lr_scale`; `linear_warmup_cosine_lr` (LAVIS): ramp from `warmup_lr`, cosine "
                     "to `min_lr`; `linear_warmup_step_lr` (LAVIS): ramp, then `init * lr_decay_rate ** epoch` "
                     "floored at `min_lr`; `constant` (or LAVIS's `constant_lr`): `init`. Evaluated per optimizer step.",
    "optim.lr.init": "Peak learning rate (after warm-up).",
    "optim.lr.warmup_proportion": "Warm-up length as a fraction of the run's optimizer steps (unless "
                                  "`warmup_steps` is set).",
    "optim.lr.warmup_steps": "Warm-up length in optimizer steps; wins over `warmup_proportion`. `null`: use the "
                             "proportion.",
    "optim.lr.min_lr": "Final / floor learning rate of the LAVIS schedules.",
    "optim.lr.warmup_lr": "Learning rate at step 0 of the LAVIS schedules' warm-up.",
    "optim.lr.lr_decay_rate": "`linear_warmup_step_lr`: factor applied once per epoch.",
    "optim.lr.param.num_cycles": "Cosine cycles of the ZeroVL schedule after warm-up (0.5: one half cosine, "
                                 "monotone decay).",
    "optim.lr.param.min_lr_scale": "ZeroVL schedule: the final learning rate is `init * min_lr_scale`.",
    "optim.lr_mult.image_tower": "Image tower's learning rate as a multiple of the schedule's (every schedule, "
                                 "every step); 0 freezes it in effect but keeps it in the optimizer.",
    "optim.lr_mult.text_tower": "Text tower's learning-rate multiple of the schedule's.",
    "optim.lr_mult.projection": "Both projections' learning-rate multiple of the schedule's.",
    "optim.lr_mult.temperature": "The learnable temperature's learning-rate multiple of the schedule's.",
    "optim.lr_abs.image_tower": "Image tower's peak learning rate, absolute (multiplier = value / `optim.lr.init`); "
                                "`null`: use `lr_mult`.",
    "optim.lr_abs.text_tower": "Text tower's peak learning rate, absolute; `null`: use `lr_mult`.",
    "optim.lr_abs.projection": "Projections' peak learning rate, absolute; `null`: use `lr_mult`.",
    "optim.lr_abs.temperature": "Temperature's peak learning rate, absolute; `null`: use `lr_mult`.",
    "optim.layer_decay.image_tower": "Layer-wise LR decay of a ViT image tower (EVA-CLIP): with L blocks, block i "
                                     "(0-based) gets `decay ** (L - i)`, patch/position embeddings and tokens "
                                     "`decay ** (L + 1)`, the final norm 1; 1.0 = off.",
    "optim.layer_decay.text_tower": "The same for a BERT-like text tower (`encoder.layer.N`; the embeddings are "
                                    "layer 0); 1.0 = off.",
    "optim.decay_all": "`true`: decay every parameter (ZeroVL); `false`: biases, norm gains and other 1-d tensors, "
                       "the temperature, position embeddings and class/mask tokens get no weight decay.",
    "optim.grad_clip": "Maximum global gradient norm (DeepSpeed `gradient_clipping`); 0 = off.",
    "optim.implementation": "Kernel of the torch optimizer: `plain` (a loop over tensors), `foreach` (batched "
                            "over tensors), `fused` (one kernel; CUDA, or CPU where torch supports it); `auto`: "
                            "`fused` on CUDA, `plain` on CPU. Same update up to floating-point rounding.",
    # ---------------------------------------------------------------- runner
    "runner.name": "`clip`: one forward and backward per rank over its share of the batch; `clip_bsgs`: ZeroVL's "
                   "decoupled gradient accumulation: embed in chunks of `data.batch_size_train`, one loss over the "
                   "whole batch, recompute each chunk with its cached gradient (same gradient, one chunk's memory).",
    "runner.val_interval": "Evaluate every this many epochs (and after the last step) when `val_interval_steps` "
                           "is not > 0.",
    "runner.val_interval_steps": "> 0: evaluate every this many optimizer steps (and after the last step) instead "
                                 "of by epochs.",
    "runner.stable_random": "`step`: reseed torch's RNG at every step from `(seed, step, rank)`, so dropout is "
                            "the same after a resume and independent across ranks; `none`: do not reseed.",
    "runner.train_steps": "> 0 fixes the number of optimizer steps (wins over `data.train_steps` and `epoch`).",
    "runner.offload_inputs": "On CUDA: keep the step's images in pinned host memory and move them one chunk at a "
                             "time (saves device memory for large `clip_bsgs` batches). No effect on CPU.",
    "runner.max_skipped_steps": "Consecutive skipped steps (non-finite loss, fp16 overflow) after which the run "
                                "stops with an error naming the last good checkpoint.",
    "runner.collective_timeout": "Seconds a rank may wait in one collective (all-reduce, barrier, broadcast) "
                                 "before the job fails, e.g. when another rank hangs. A rank that raises ends "
                                 "the job at once regardless; raise this only for collectives that legitimately "
                                 "wait long (a universal checkpoint conversion of a large model on rank 0).",
    "runner.world_size": "LAVIS `run.world_size`: > 0 must equal the number of ranks the launcher started; "
                         "-1: not checked.",
    "runner.task": "What the run trains for: `retrieval` (LAVIS `run.task`); any other value is refused.",
    # ---------------------------------------------------------------- ckpt
    "ckpt.dir": "Output root; the run folder is `ckpt.dir/data.exp_name`.",
    "ckpt.step_interval": "Save a checkpoint every this many optimizer steps (and after the last step).",
    "ckpt.filename": "Accepted for ZeroVL configs; unused (checkpoints are `step_NNNNNNNN` folders).",
    "ckpt.keep_last": "Checkpoints kept in the run folder; older ones are deleted (never the one `latest` names).",
    "ckpt.auto_resume": "Resume from the run folder's `latest` checkpoint when there is one.",
    "ckpt.overwrite": "With `ckpt.auto_resume: false` (and no `resume_ckpt_path`): start from scratch in a run "
                      "folder that already holds checkpoints (replacing them as new ones are saved). Without it "
                      "such a run is refused (exit 2), so old checkpoints are not lost by mistake.",
    "ckpt.soft_resume": "Accepted for ZeroVL configs; unused.",
    "ckpt.external_resume": "Accepted for ZeroVL configs; unused (use `resume_ckpt_path`).",
    "ckpt.trust_checkpoint": "Open the resumed checkpoint's files without first checking that they hold only "
                             "weights (tensors, plain values): set it only for checkpoints you wrote yourself, "
                             "since DeepSpeed's loader unpickles them and a crafted file runs code.",
    # ---------------------------------------------------------------- log
    "log.interval_train": "Print a console line every this many steps (TensorBoard gets every step).",
    "log.interval_val": "Accepted for ZeroVL configs; unused.",
    "log.tensorboard": "Write TensorBoard events to `RUN/tensorboard` (rank 0).",
    "log.num_image_samples": "Validation images shown in TensorBoard with their top-3 retrieved captions at each "
                             "evaluation (0: none).",
    "log.record_sample_keys": "Append each step's sample keys to `RUN/sample_keys/rank_N.txt` (data audit).",
    # ---------------------------------------------------------------- dist
    "dist.name": "Accepted for ZeroVL configs; unused (the launcher and DeepSpeed set up the processes).",
    "dist.fp16": "ZeroVL's mixed-precision flag: when `precision` is null, `true` selects `fp16`, `false` `fp32`.",
    "dist.param.opt_level": "Accepted for ZeroVL configs (apex opt level); unused.",
    "dist.url": "Accepted for ZeroVL and LAVIS (`run.dist_url`) configs; unused (rendezvous comes from the "
                "launcher's environment).",
    "dist.distributed": "Accepted for ZeroVL and LAVIS (`run.distributed`) configs; unused (the launcher decides).",
    # ---------------------------------------------------------------- wandb
    "wandb.enable": "Accepted for ZeroVL configs; unused (no Weights & Biases logging; see `log.tensorboard`).",
    "wandb.project": "Accepted for ZeroVL configs; unused.",
    "wandb.entity": "Accepted for ZeroVL configs; unused.",
}

# model.arch presets (zvl_ds.config.MODEL_PRESETS) -> one line each
PRESET_HELP: Dict[str, str] = {
    "vit_b16_bert_base": "The paper's model: ViT-B/16 (ImageNet-21k, 224 px) + BERT-base, [CLS] pooling, 512-d "
                         "simple projections, 25 tokens. Needs both models in the local caches.",
    "tiny": "A CPU-sized model built from configs, no weights: a 2-block ViT at 32 px (patch 8, width 64) and a "
            "2-layer BERT (width 64) with the packaged demo tokenizer, 64-d projections, 16 tokens.",
}

# LAVIS run.* keys (zvl_ds.config.LAVIS_RUN_MAP) whose value is converted, or whose meaning differs from LAVIS's
LAVIS_NOTES: Dict[str, str] = {
    "amp": "`true` -> `fp16`, `false` -> `fp32`; a string is taken as the precision",
    "batch_size_train": "GLOBAL DGA chunk here, used by `clip_bsgs` only; LAVIS's is the per-GPU batch",
    "batch_size_eval": "GLOBAL here; LAVIS's is per GPU",
    "lr_sched": "LAVIS's names are accepted as they are (`constant_lr` too)",
    "warmup_lr": "LAVIS's -1 meaning `init_lr` is not special here; default 0",
    "test_splits": "unused",
    "task": "`retrieval` only; any other task is refused by name",
    "dist_url": "unused",
    "distributed": "unused",
}
