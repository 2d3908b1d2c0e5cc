"""Ranks draw independent dropout, and the trainer's step seeds it as the reference does (2 real processes).

The exactness tests compare a distributed step with a reference that replays each rank's dropout; if every rank
drew the same masks, a reference seeded the same way would agree with it. Here the step is the trainer's own
(``build_step`` on a DeepSpeed engine), both ranks get the same input, and the masks of the text tower's first
dropout are read from the step itself: they must differ between the ranks and between steps, and equal the masks
that ``reference_rank_seed`` (the reference's own seed derivation, not the trainer's ``step_seed``) gives.
"""
import torch

from tests.helpers.dist_utils import run_distributed
from zvl_ds.config import load_config

STEPS = 2


def dropout_masks(model):
    """Record which inputs the text embeddings' dropout zeroes, one mask per forward, and the hook's handle."""
    masks = []

    def record(module, inputs, output):
        masks.append(((output == 0) & (inputs[0] != 0)).detach().clone())

    return masks, model.text_tower.embeddings.dropout.register_forward_hook(record)


def _worker(rank, world_size):
    from zvl_ds.model.build import build_model
    from zvl_ds.objective.build import build_step
    from zvl_ds.objective.exactness import reference_rank_seed
    from zvl_ds.objective.step import StepBatch
    from zvl_ds.runtime.engine import build_ds_config, initialize_engine
    from zvl_ds.runtime.optim import build_optimizer

    cfg = load_config(None, ["model.arch=tiny", "seed=5", "data.batch_size=8", "data.batch_size_train=4",
                             "loss.name=MixUpNCE", "optim.name=SGD", "runner.name=clip_bsgs",
                             # the step's normalisation is then x / 255, which prepare() below repeats
                             "transforms.normalize.mean=[0, 0, 0]", "transforms.normalize.std=[1, 1, 1]"])
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.loss)
    engine = initialize_engine(model, build_optimizer(model, cfg.optim),
                               build_ds_config({"zero_optimization": {"stage": 0}}, cfg, world_size))
    # the same local batch on both ranks: any difference between their masks comes from the seeding
    generator = torch.Generator().manual_seed(17)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=generator)
    input_ids = torch.randint(5, 200, (4, cfg.model.max_length), generator=generator)
    batch = StepBatch(images, input_ids, torch.ones_like(input_ids))
    prepare = lambda x: x.float() / 255.0  # noqa: E731
    step = build_step(cfg, world_size, rank)
    chunk = step.options.chunk
    assert chunk == 2  # two chunks per rank per pass

    masks, hook = dropout_masks(model)
    step_masks = []
    for index in range(STEPS):
        del masks[:]
        assert step(engine, batch, index).applied
        assert len(masks) == 4  # pass 1 and pass 2 over two chunks
        step_masks.append(masks[0])  # the first chunk's mask in pass 1
    hook.remove()

    # the reference's seeding: a fresh model, seeded from reference_rank_seed, the first chunk forwarded once
    reference_model = build_model(cfg.model, cfg.loss).train()
    masks, hook = dropout_masks(reference_model)
    reference_masks = []
    for index in range(STEPS):
        del masks[:]
        torch.manual_seed(reference_rank_seed(cfg.seed, index, rank))
        with torch.no_grad():
            reference_model(images=prepare(images[:chunk]), input_ids=input_ids[:chunk],
                            attention_mask=torch.ones_like(input_ids[:chunk]), mixup=step.mixup(index))
        reference_masks.append(masks[0])
    hook.remove()
    return {"step": step_masks, "reference": reference_masks}


def test_ranks_draw_independent_dropout_seeded_as_the_reference_seeds_it():
    results = run_distributed(_worker, 2, timeout=240)
    for index in range(STEPS):
        rank0, rank1 = results[0]["step"][index], results[1]["step"][index]
        assert rank0.shape == rank1.shape and 0 < int(rank0.sum()) < rank0.numel()  # p = 0.1 dropout drew masks
        assert not torch.equal(rank0, rank1), f"step {index}: both ranks drew the same dropout masks"
        for rank in (0, 1):
            assert torch.equal(results[rank]["step"][index], results[rank]["reference"][index]), \
                f"rank {rank} step {index}: the trainer's step seeds dropout differently from the reference"
    for rank in (0, 1):
        assert not torch.equal(results[rank]["step"][0], results[rank]["step"][1]), \
            f"rank {rank}: steps 0 and 1 drew the same dropout masks"
