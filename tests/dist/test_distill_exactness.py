"""Distillation under DGA equals a plain single-process full-batch computation (real processes, gloo).

A tiny Hugging Face teacher that differs from the ``tiny`` student in both inputs (48 px against 32 px, its own
tokenizer) distils into the student on 2 ranks at ZeRO 0, 2 and 3, for both loss families (softmax: NCE +
DistillClipLoss; sigmoid: SigLIP + DistillSigLipLoss), with dropout and drop-path on, 5 x 3 logits tiles and
weights other than 1. Two SGD steps each, compared with the reference: one process, the whole batch, one autograd
graph, the dense losses of ``dense_reference`` with the teacher's embeddings of the whole batch. One spawn runs every
case; at ZeRO-3 it also measures the teacher's weights each rank holds (partitioned, not replicated).

The stored cases (``distill.source: stored``) give the step no teacher: each rank's batch carries the teacher's
embeddings of its samples as the loader reads them from reinforced shards (float16, to float32 in the step), and
the reference takes the same embeddings of the whole batch.
"""

import pytest
import torch

from tests.helpers.dist_utils import run_distributed
from zvl_ds.config import load_config
from zvl_ds.objective.exactness import ReferenceDistillation, compare_tensors, reference_loss

GLOBAL_BATCH, CHUNK, STEPS, LR = 16, 4, 2, 0.5
STUDENT_SIZE, TEACHER_SIZE = 32, 48
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
WORDS = ["a", "red", "blue", "green", "circle", "square", "triangle", "small", "large", "on", "the", "left", "two"]
ONLINE, STORED = "online", "stored"
# ZeRO-3 last: it patches F.linear
CASES = [(stage, loss, source) for source in (ONLINE, STORED) for stage in (0, 2, 3) for loss in ("NCE", "SigLIP")]
CASES.sort(key=lambda case: case[0] == 3)
# the stored teacher's logit scale and bias, as the embeddings' header would record them (the tiny teachers' own)
STORED_SCALE_BIAS = {"NCE": (20.0, None), "SigLIP": (8.0, -6.0)}
STORED_WIDTH = 16


def make_cfg(loss_name, teacher_dir, source=ONLINE):
    overrides = ["model.arch=tiny", "seed=3", f"data.batch_size={GLOBAL_BATCH}", f"data.batch_size_train={CHUNK}",
                 "runner.name=clip_bsgs", f"loss.name={loss_name}", "loss.chunk_rows=5", "loss.chunk_cols=3",
                 "optim.name=SGD", f"optim.lr.init={LR}", "optim.param.weight_decay=0.01",
                 f"transforms.normalize.mean={MEAN}", f"transforms.normalize.std={STD}",
                 f"transforms.random_resize_crop.size={STUDENT_SIZE}", "model.image_encoder.kwargs.drop_path_rate=0.2",
                 f"distill.teacher={teacher_dir}", "distill.weight=0.7", "distill.contrastive_weight=0.5",
                 f"distill.source={source}"]
    overrides += (["loss.temperature.name=constant", "loss.sigmoid.scale_init=4.0", "loss.sigmoid.bias_init=-3.0"]
                  if loss_name == "SigLIP" else ["loss.temperature.name=parameter", "loss.temperature.value=0.1"])
    return load_config(None, overrides)


def global_batch(cfg, teacher_tokenizer):
    """uint8 images at the teacher's (larger) side, and captions tokenized by both tokenizers."""
    from zvl_ds.data import load_tokenizer, tokenize

    generator = torch.Generator().manual_seed(11)
    images = torch.randint(0, 256, (GLOBAL_BATCH, 3, TEACHER_SIZE, TEACHER_SIZE), dtype=torch.uint8,
                           generator=generator)
    picks = torch.randint(0, len(WORDS), (GLOBAL_BATCH, 6), generator=generator).tolist()
    captions = [" ".join(WORDS[i] for i in row[:2 + n % 5]) for n, row in enumerate(picks)]
    ids, mask = tokenize(load_tokenizer(cfg.model.text_encoder), captions, cfg.model.max_length)
    teacher_ids, teacher_mask = tokenize(teacher_tokenizer, captions, 20)
    return images, ids, mask, teacher_ids, teacher_mask


def stored_batch(cfg):
    """The student's crops at its own side (no teacher view to make) and the teacher's stored embeddings of the
    samples: L2-normalised, then float16 as the shards hold them."""
    from zvl_ds.data import load_tokenizer, tokenize

    generator = torch.Generator().manual_seed(12)
    images = torch.randint(0, 256, (GLOBAL_BATCH, 3, STUDENT_SIZE, STUDENT_SIZE), dtype=torch.uint8,
                           generator=generator)
    ids, mask = tokenize(load_tokenizer(cfg.model.text_encoder), [f"a red circle {n}" for n in range(GLOBAL_BATCH)],
                         cfg.model.max_length)
    embeddings = [torch.nn.functional.normalize(torch.randn(GLOBAL_BATCH, STORED_WIDTH, generator=generator), dim=-1)
                  .half() for _ in range(2)]
    return images, ids, mask, embeddings[0], embeddings[1]


def _stored_step(cfg, world_size, rank, loss_name):
    from zvl_ds.model.teacher import StoredTeacher
    from zvl_ds.objective.build import build_step
    from zvl_ds.objective.distill_loss import TeacherEmbeddings
    from zvl_ds.objective.step import StepBatch

    images, ids, mask, stored_image, stored_text = stored_batch(cfg)
    local = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    # as the trainer hands the loader's float16 embeddings to the step
    embeddings = TeacherEmbeddings(stored_image[local].float(), stored_text[local].float())
    batch = StepBatch(images[local], ids[local], mask[local], teacher_embeddings=embeddings)
    scale, bias = STORED_SCALE_BIAS[loss_name]
    stored = StoredTeacher(identity={"sha256": "stored"}, scale=scale, bias=bias, width=STORED_WIDTH, shards=1)
    return build_step(cfg, world_size, rank, stored=stored), batch


def _case(rank, world_size, stage, loss_name, source, teacher_dir):
    import deepspeed

    from zvl_ds.model.build import build_model
    from zvl_ds.model.teacher import load_teacher
    from zvl_ds.objective.build import build_step
    from zvl_ds.objective.step import StepBatch
    from zvl_ds.runtime.engine import build_ds_config, initialize_engine
    from zvl_ds.runtime.optim import build_optimizer

    cfg = make_cfg(loss_name, teacher_dir, source)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.loss)
    ds_config = build_ds_config({"zero_optimization": {"stage": stage}}, cfg, world_size)
    engine = initialize_engine(model, build_optimizer(model, cfg.optim), ds_config)
    teacher = None
    if source == STORED:
        step, batch = _stored_step(cfg, world_size, rank, loss_name)
    else:
        teacher = load_teacher(cfg, torch.device("cpu"), torch.float32, ds_config)
        images, ids, mask, teacher_ids, teacher_mask = global_batch(cfg, teacher.tokenizer)
        per_rank = GLOBAL_BATCH // world_size
        local = slice(rank * per_rank, (rank + 1) * per_rank)
        batch = StepBatch(images[local], ids[local], mask[local], teacher_ids[local], teacher_mask[local])
        step = build_step(cfg, world_size, rank, teacher=teacher)
    assert (step.options.teacher is None) == (source == STORED)  # a stored teacher is never run in the step
    results = [step(engine, batch, index) for index in range(STEPS)]
    assert all(result.applied for result in results), [result.skip_reason for result in results]
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        state = {name: p.detach().float().clone() for name, p in engine.module.named_parameters()}
    result = {"params": state if rank == 0 else None, "losses": [result.loss for result in results],
              "parts": [result.parts for result in results]}
    if teacher is not None:
        result.update(teacher_bytes=teacher.parameter_bytes(),
                      teacher_trainable=sum(p.requires_grad for p in teacher.module.parameters()),
                      teacher_training=teacher.module.training)
    return result


def _all_cases(rank, world_size, teacher_dirs):
    return {case: _case(rank, world_size, *case, teacher_dirs[case[1]]) for case in CASES}


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
    from tools.tiny_checkpoints import write_tiny_teacher_folder

    root = tmp_path_factory.mktemp("teachers")
    return {"NCE": write_tiny_teacher_folder(str(root / "clip"), "hf_clip"),
            "SigLIP": write_tiny_teacher_folder(str(root / "siglip"), "hf_siglip")}


@pytest.fixture(scope="module")
def runs(teacher_dirs):
    """Every case on 2 ranks, in one spawn."""
    return run_distributed(_all_cases, 2, (teacher_dirs,), timeout=420)


def stored_reference(cfg, loss_name):
    """The stored case's whole batch: the student's view and the same stored embeddings of every sample."""
    images, ids, mask, stored_image, stored_text = stored_batch(cfg)
    student_view = (images.float() / 255.0 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    scale, bias = STORED_SCALE_BIAS[loss_name]
    distillation = ReferenceDistillation(stored_image.float(), stored_text.float(), scale, bias, weight=0.7,
                                         contrastive_weight=0.5)
    return student_view, ids, mask, distillation


def reference(loss_name, teacher_dir, source=ONLINE):
    """The full-batch reference: SGD on the dense combined loss, the teacher's embeddings of the whole batch."""
    from zvl_ds.model.build import build_model
    from zvl_ds.runtime.optim import build_optimizer

    cfg = make_cfg(loss_name, teacher_dir, source)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.loss)
    model.train()
    optimizer = build_optimizer(model, cfg.optim)
    if source == STORED:
        student_view, ids, mask, distillation = stored_reference(cfg, loss_name)
    else:
        student_view, ids, mask, distillation = online_reference(cfg, teacher_dir)
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = reference_loss(model, student_view, ids, mask, world_size=2, chunk=CHUNK // 2, seed=cfg.seed,
                              step=step, mixup=None, distillation=distillation)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return {name: p.detach().clone() for name, p in model.named_parameters()}, losses


def online_reference(cfg, teacher_dir):
    """The online case's whole batch: the student's view of the crops and the teacher's embeddings of its own."""
    from zvl_ds.data.transforms import normalize_images
    from zvl_ds.model.teacher import load_teacher

    teacher = load_teacher(cfg, torch.device("cpu"), torch.float32)
    images, ids, mask, teacher_ids, teacher_mask = global_batch(cfg, teacher.tokenizer)
    pixels = images.float() / 255.0
    # each view of the one crop: the student's resized down to its side, the teacher's at its own, own normalisation
    student_view = torch.nn.functional.interpolate(pixels, size=(STUDENT_SIZE, STUDENT_SIZE), mode="bilinear",
                                                   antialias=True, align_corners=False)
    student_view = (student_view - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = teacher.module(images=normalize_images(images, teacher.normalize, "cpu"), input_ids=teacher_ids,
                             attention_mask=teacher_mask)
    distillation = ReferenceDistillation(out["image_embeds"], out["text_embeds"], teacher.scale, teacher.bias,
                                         weight=0.7, contrastive_weight=0.5)
    return student_view, ids, mask, distillation


@pytest.fixture(scope="module")
def references(teacher_dirs):
    return {(loss_name, source): reference(loss_name, teacher_dirs[loss_name], source)
            for loss_name in ("NCE", "SigLIP") for source in (ONLINE, STORED)}


@pytest.mark.parametrize("stage,loss_name,source", CASES)
def test_distillation_dga_matches_full_batch_reference(runs, references, stage, loss_name, source):
    result = runs[0][(stage, loss_name, source)]
    expected, expected_losses = references[(loss_name, source)]
    assert result["losses"] == pytest.approx(expected_losses, rel=1e-5)
    worst = compare_tensors(result["params"], expected)
    name, value = max(worst.items(), key=lambda item: item[1])
    print(f"ZeRO-{stage} {loss_name} {source}: worst relative difference {value:.2e} ({name})")  # pytest -s
    assert value <= 1e-5, f"{name}: relative difference {value:.2e} > 1e-5"
    # both terms are logged, and they make up the loss with their weights
    for parts, loss in zip(result["parts"], result["losses"]):
        assert set(parts) == {"distill_loss", "contrastive_loss"}
        assert 0.5 * parts["contrastive_loss"] + 0.7 * parts["distill_loss"] == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_teacher_is_frozen_and_partitioned_only_at_zero3(runs, stage):
    for rank_results in runs:
        result = rank_results[(stage, "NCE", ONLINE)]
        held, whole = result["teacher_bytes"]
        assert result["teacher_trainable"] == 0 and result["teacher_training"] is False
        if stage == 3:  # each of the 2 ranks holds its half (DeepSpeed pads each tensor to a multiple of 2)
            print(f"ZeRO-3 teacher weights on a rank: {held} of {whole} bytes ({held / whole:.3f})")
            assert whole / 2 <= held <= whole / 2 + 4 * 64 * 2
        else:
            assert held == whole
