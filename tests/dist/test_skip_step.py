"""A non-finite loss on one rank skips the step on every rank and leaves the parameters untouched (gloo)."""
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
    return result.applied, result.skip_reason, unchanged


def test_non_finite_loss_skips_the_step_on_every_rank():
    from tests.helpers.dist_utils import run_distributed

    results = run_distributed(_nan_step_worker, 2)
    assert results == [(False, "non-finite loss", True)] * 2
