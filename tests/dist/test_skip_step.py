"""A non-finite loss on one rank skips the step on every rank and leaves the parameters untouched; at ZeRO-3 the
non-finite weights check reads only the values a partition holds, never its padding (gloo)."""
import torch

from zvl_ds.config import load_config


def _nan_step_worker(rank, world_size):
    from zvl_ds.objective.losses import SoftmaxLoss
    from zvl_ds.objective.step import StepBatch, StepOptions, dga_step
    from zvl_ds.runtime.engine import build_ds_config, initialize_engine
    from zvl_ds.model.build import build_model
    from zvl_ds.runtime.optim import build_optimizer

    cfg = load_config(None, ["model.arch=tiny", "data.batch_size=8", "optim.name=SGD", "optim.lr.init=0.1"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss)
    engine = initialize_engine(model, build_optimizer(model, cfg.optim),
                               build_ds_config({"zero_optimization": {"stage": 2}}, cfg, world_size))
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    poisoned = rank == 1  # one rank's inputs are broken: every rank must skip together

    def prepare(images):
        out = images.float() / 255
        return out * float("nan") if poisoned else out

    batch = StepBatch(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.ones(4, 16, dtype=torch.long),
                      torch.ones(4, 16, dtype=torch.long))
    result = dga_step(engine, batch, StepOptions(chunk=2, loss=SoftmaxLoss(chunk_rows=4), prepare_images=prepare),
                      None, None)
    unchanged = all(torch.equal(before[n], p) for n, p in engine.module.named_parameters())
    return result.applied, result.skip_reason, unchanged, _zero3_padding_check(cfg, world_size, rank)


def _zero3_padding_check(cfg, world_size, rank):
    """At ZeRO-3 the last rank's partition of a parameter whose size the world size does not divide ends in
    padding that DeepSpeed never writes: NaN planted there must not read as a non-finite weight (it stopped a
    healthy run once), while NaN in a value the rank holds must."""
    from zvl_ds.objective.skip import local_weights_finite
    from zvl_ds.runtime.engine import build_ds_config, initialize_engine

    module = torch.nn.Linear(3, 3)  # 9 weights and 3 biases: 5 + 4 and 2 + 1 over two ranks, one padded value each
    engine = initialize_engine(module, torch.optim.SGD(module.parameters(), lr=0.1),
                               build_ds_config({"zero_optimization": {"stage": 3}}, cfg, world_size))
    partition = engine.module.weight.ds_tensor
    padded = partition.numel() * world_size - engine.module.weight.ds_numel
    finite_before = local_weights_finite(engine.module)
    with torch.no_grad():
        if rank == world_size - 1:
            partition[partition.numel() - padded:] = float("nan")  # the padding only
    finite_with_nan_padding = local_weights_finite(engine.module)
    with torch.no_grad():
        partition[0] = float("nan")  # a value this rank holds
    finite_with_nan_weight = local_weights_finite(engine.module)
    return padded, finite_before, finite_with_nan_padding, finite_with_nan_weight


def test_non_finite_loss_skips_the_step_on_every_rank():
    from tests.helpers.dist_utils import run_distributed

    results = run_distributed(_nan_step_worker, 2)
    assert [result[:3] for result in results] == [(False, "non-finite loss", True)] * 2
    assert [result[3] for result in results] == [(1, True, True, False)] * 2
