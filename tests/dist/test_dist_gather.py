"""Real multi-process (gloo, fp32/fp64) proofs that the distributed loss is the full-batch loss.

Each world size spawns its ranks once and runs every check there (spawning costs seconds per rank on 2 cores);
the workers return measured errors and the tests assert on them. References are single-process, full-batch
computations written in this file, run inside each worker on the concatenated global batch.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.helpers.dist_utils import run_distributed
from zvl_ds.objective.dense_reference import dense_contrastive_loss, dense_sigmoid_loss

PER_RANK = 4  # samples per rank in the model check
TOLERANCE = 1e-5  # of each tensor's largest magnitude




def _reversed_blocks(batch, block):
    return torch.tensor([i for start in range(0, batch, block) for i in reversed(range(start, start + block))])


def _rel_error(actual, expected):
    scale = expected.abs().max().clamp(min=1e-12)
    return float((actual - expected).abs().max() / scale)


# ---------------------------------------------------------------------------------------------- gathers


def _gather_checks(rank, world_size):
    from zvl_ds.runtime.dist import gather_no_grad, gather_with_grad

    rows, cols = 2, 3
    base = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)
    x = (base + 100 * rank).requires_grad_(True)
    y = gather_with_grad(x)
    expected = torch.cat([base + 100 * r for r in range(world_size)])
    # this rank's loss weights every gathered row; rank r uses weight (r + 1)
    weights = torch.arange(y.numel(), dtype=torch.float32).reshape(y.shape)
    ((rank + 1) * weights * y).sum().backward()
    # d(sum over ranks of their losses)/dx_r = sum_r' (r' + 1) * weights[rows of r]
    want_grad = sum(r + 1 for r in range(world_size)) * weights[rank * rows:(rank + 1) * rows]
    z = gather_no_grad(x)
    try:
        gather_with_grad(torch.zeros(rank + 1, cols))
    except ValueError as error:
        mismatch_message = str(error)
    else:
        mismatch_message = ""
    return {"forward": bool(torch.equal(y, expected)), "backward": bool(torch.equal(x.grad, want_grad)),
            "plain_forward": bool(torch.equal(z, expected)), "plain_detached": not z.requires_grad,
            "mismatch_message": mismatch_message}


# ---------------------------------------------------------------------------------------------- model


def _tiny_config():
    from zvl_ds.config import config_from_dict

    return config_from_dict({
        "model": {"arch": "tiny", "text_encoder": {"config": {
            "model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 128, "max_position_embeddings": 64, "vocab_size": 300,
            # dropout draws differ between a per-rank and a full-batch forward; the maths is what is tested
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}},
        "loss": {"temperature": {"name": "parameter", "value": 0.07}},
    })


def _global_batch(batch):
    gen = torch.Generator().manual_seed(1234)
    images = torch.randn(batch, 3, 32, 32, generator=gen)
    input_ids = torch.randint(1, 300, (batch, 16), generator=gen)
    lengths = torch.randint(4, 17, (batch,), generator=gen)
    attention_mask = (torch.arange(16)[None, :] < lengths[:, None]).long()
    return images, input_ids, attention_mask


def _reference_embeddings(model, images, input_ids, attention_mask, mixup, partner):
    """Full-batch forward with the mixing written out here: x_i <- lam x_i + (1 - lam) x_partner(i)."""
    if mixup is not None and mixup.side == "image":
        images = mixup.lam * images + (1 - mixup.lam) * images[partner]
    image = F.normalize(model.image_projection(model.image_features(images)), dim=-1)
    projected = model.text_projection(model.text_features(input_ids, attention_mask))
    if mixup is not None and mixup.side == "text":
        projected = mixup.lam * projected + (1 - mixup.lam) * projected[partner]
    return image, F.normalize(projected, dim=-1)


def _grads(model):
    return {name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for name, p in model.named_parameters()}


def _model_checks(rank, world_size):
    from zvl_ds.objective.softmax_loss import contrastive_loss
    from zvl_ds.model.mixing import MixupDraw
    from zvl_ds.objective.mixup import partner_index
    from zvl_ds.model.build import build_model

    cfg = _tiny_config()
    torch.manual_seed(0)  # identical weights on every rank
    model = build_model(cfg.model, cfg.loss)
    model.train()
    batch = PER_RANK * world_size
    images, input_ids, attention_mask = _global_batch(batch)
    local = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    partner = partner_index(batch, world_size, PER_RANK)
    assert torch.equal(partner, _reversed_blocks(batch, PER_RANK))
    cases = {  # name: (mixup, gather_backward, chunk_cols)
        "nce": (None, True, 0),
        "mixup_image": (MixupDraw(0.35, "image"), True, 0),
        "mixup_text": (MixupDraw(0.6, "text"), True, 0),
        # column tiles: with gather-backward both directions come from one strip of tiles per rank
        "nce_tiled": (None, True, 3),
        "mixup_text_tiled": (MixupDraw(0.6, "text"), True, 2),
        "nce_gather_backward_off": (None, False, 0),
        "mixup_image_gather_backward_off": (MixupDraw(0.35, "image"), False, 0),
        "nce_gather_backward_off_tiled": (None, False, 3),
    }
    report = {}
    for name, (mixup, gather_backward, chunk_cols) in cases.items():
        model.zero_grad(set_to_none=True)
        out = model(images=images[local], input_ids=input_ids[local], attention_mask=attention_mask[local],
                    mixup=mixup)
        loss, logged = contrastive_loss(out["image_embeds"], out["text_embeds"], out["temperature"], mixup=mixup,
                                        partner=partner, gather_backward=gather_backward, chunk_rows=3,
                                        chunk_cols=chunk_cols)
        loss.backward()
        averaged = _grads(model)
        for grad in averaged.values():  # what a data-parallel engine does
            dist.all_reduce(grad)
            grad /= world_size

        model.zero_grad(set_to_none=True)
        image, text = _reference_embeddings(model, images, input_ids, attention_mask, mixup, partner)
        lam = None if mixup is None else mixup.lam
        ref = dense_contrastive_loss(image, text, model.temperature(), lam, partner, detach_keys=not gather_backward)
        ref.backward()
        reference = _grads(model)
        # Per-tensor relative error. A few gradients are mathematically zero and only float noise (~1e-11
        # here: attention key biases, which softmax ignores); comparing noise with noise means nothing, so
        # those (below 1e-7 of the model's largest gradient) are measured against that largest gradient.
        largest = max(float(g.abs().max()) for g in reference.values())
        errors = {p: float((averaged[p] - reference[p]).abs().max())
                  / (largest if reference[p].abs().max() < 1e-7 * largest else float(reference[p].abs().max()))
                  for p in reference if reference[p].abs().max() > 0}
        zero_ref_mismatch = [p for p in reference if reference[p].abs().max() == 0 and averaged[p].abs().max() > 0]
        case = {"max_error": max(errors.values()), "worst": max(errors, key=errors.get),
                "params": len(errors), "zero_ref_mismatch": zero_ref_mismatch,
                "loss_error": abs(logged.loss.item() - ref.item()), "tau_error": errors.get("tau", 1.0)}
        if not gather_backward:
            # how far the documented "detached keys" gradient is from the full one (must be far)
            model.zero_grad(set_to_none=True)
            image, text = _reference_embeddings(model, images, input_ids, attention_mask, mixup, partner)
            dense_contrastive_loss(image, text, model.temperature(), lam, partner).backward()
            full = _grads(model)
            case["distance_from_full"] = _rel_error(averaged["image_projection.weight"],
                                                    full["image_projection.weight"])
        report[name] = case
    return report


# ---------------------------------------------------------------------------------------------- cached grads


def _cached_grad_checks(rank, world_size):
    from zvl_ds.runtime.dist import gather_no_grad
    from zvl_ds.objective.softmax_loss import contrastive_loss, loss_and_grads
    from zvl_ds.model.mixing import MixupDraw
    from zvl_ds.objective.mixup import partner_index

    per_rank, dim, chunk = 6, 5, 3
    batch = per_rank * world_size
    gen = torch.Generator().manual_seed(99)
    image = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1)
    local = slice(rank * per_rank, (rank + 1) * per_rank)
    report = {}
    cases = {  # name: (mixup, partner, chunk_cols)
        "nce": (None, None, 0),
        # DGA's partner: reversal within each per-rank chunk
        "mixup": (MixupDraw(0.7, "text"), partner_index(batch, world_size, chunk), 0),
        "nce_tiled": (None, None, 4),
        "mixup_tiled": (MixupDraw(0.7, "text"), partner_index(batch, world_size, chunk), 5),
        # a partner on another rank: its target pair lies in another rank's strip of tiles
        "mixup_tiled_cross_rank": (MixupDraw(0.4, "image"), partner_index(batch, 1, batch), 5),
    }
    for name, (mixup, partner, chunk_cols) in cases.items():
        for tau_value in (0.05, 0.001):
            tau = torch.tensor([tau_value], dtype=torch.float64)
            cached = loss_and_grads(image[local], text[local], tau, mixup=mixup, partner=partner, chunk_rows=4,
                                    chunk_cols=chunk_cols)
            # what an engine that averages over ranks makes of the cached gradients: the tau shares averaged, and
            # rank r's image/text rows (every other rank back-propagates zeros into r's samples) divided by the
            # world size; this must be the full-batch gradient
            averaged_tau = cached.loss_params.clone()
            dist.all_reduce(averaged_tau)
            averaged_tau /= world_size
            full_image = gather_no_grad(cached.image) / world_size
            full_text = gather_no_grad(cached.text) / world_size

            ref_image = image.clone().requires_grad_(True)
            ref_text = text.clone().requires_grad_(True)
            ref_tau = tau.clone().requires_grad_(True)
            ref = dense_contrastive_loss(ref_image, ref_text, ref_tau, None if mixup is None else mixup.lam, partner)
            grads = torch.autograd.grad(ref, [ref_image, ref_text, ref_tau])
            logits = image @ text.t()
            hard = torch.arange(batch)
            report[f"{name}_tau{tau_value}"] = {
                "image": _rel_error(full_image, grads[0]), "text": _rel_error(full_text, grads[1]),
                "tau": _rel_error(averaged_tau, grads[2]),
                "loss": abs(cached.output.loss.item() - ref.item()) / abs(ref.item()),
                "i2t_acc": abs(cached.output.i2t_acc - (logits.argmax(1) == hard).double().mean().item()),
                "t2i_acc": abs(cached.output.t2i_acc - (logits.argmax(0) == hard).double().mean().item()),
                "finite": bool(torch.isfinite(cached.image).all() and torch.isfinite(cached.loss_params).all()),
                "local_tau_share": cached.loss_params.item(), "logged_loss": cached.output.loss.item(),
            }
        # the single-pass form with a default partner (reversal of each rank's whole batch)
        _, logged = contrastive_loss(image[local], text[local], torch.tensor([0.05], dtype=torch.float64),
                                     mixup=mixup, partner=None, gather_backward=True, chunk_rows=5,
                                     chunk_cols=chunk_cols)
        expected = dense_contrastive_loss(image, text, 0.05, None if mixup is None else mixup.lam,
                                   _reversed_blocks(batch, per_rank))
        report[f"{name}_default_partner_loss"] = abs(logged.loss.item() - expected.item())
    return report


def _tied_accuracy_checks(rank, world_size):
    """Tiled accuracy with exact ties across ranks equals argmax over the full batch (the first maximum)."""
    from zvl_ds.objective.softmax_loss import contrastive_loss

    per_rank = 5
    batch = per_rank * world_size
    gen = torch.Generator().manual_seed(3)
    image = F.one_hot(torch.randint(0, 3, (batch,), generator=gen), 4).double()
    text = F.one_hot(torch.randint(0, 3, (batch,), generator=gen), 4).double()
    text[::3] = image[::3]
    local = slice(rank * per_rank, (rank + 1) * per_rank)
    logits, hard = image @ text.t(), torch.arange(batch)
    want = ((logits.argmax(1) == hard).double().mean().item(), (logits.argmax(0) == hard).double().mean().item())
    got = {}
    for chunk_rows, chunk_cols in ((2, 3), (5, 1), (1, 100)):
        _, output = contrastive_loss(image[local], text[local], torch.tensor([0.1], dtype=torch.float64),
                                     chunk_rows=chunk_rows, chunk_cols=chunk_cols)
        got[f"{chunk_rows}x{chunk_cols}"] = (output.i2t_acc, output.t2i_acc)
    return {"want": want, "got": got}


# ---------------------------------------------------------------------------------------------- sigmoid loss


def _sigmoid_model_checks(rank, world_size):
    """SigLIP through the model: per-rank losses with gather-backward, gradients averaged as an engine does."""
    from zvl_ds.model.build import build_model
    from zvl_ds.objective.sigmoid_loss import sigmoid_loss

    cfg = _tiny_config()
    cfg.loss.name, cfg.loss.temperature.name = "SigLIP", "constant"
    cfg.loss.sigmoid.scale_init, cfg.loss.sigmoid.bias_init = 5.0, -2.0
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss)
    model.train()
    batch = PER_RANK * world_size
    images, input_ids, attention_mask = _global_batch(batch)
    local = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    out = model(images=images[local], input_ids=input_ids[local], attention_mask=attention_mask[local])
    loss, logged = sigmoid_loss(out["image_embeds"], out["text_embeds"], out["logit_scale_bias"], chunk_rows=3,
                                chunk_cols=2)
    loss.backward()
    averaged = _grads(model)
    for grad in averaged.values():
        dist.all_reduce(grad)
        grad /= world_size
    model.zero_grad(set_to_none=True)
    image, text = _reference_embeddings(model, images, input_ids, attention_mask, None, None)
    scale_bias = model.logit_scale_bias()
    ref = dense_sigmoid_loss(image, text, scale_bias[0], scale_bias[1])
    ref.backward()
    reference = _grads(model)
    largest = max(float(g.abs().max()) for g in reference.values())
    errors = {p: float((averaged[p] - reference[p]).abs().max())
              / (largest if reference[p].abs().max() < 1e-7 * largest else float(reference[p].abs().max()))
              for p in reference if reference[p].abs().max() > 0}
    return {"max_error": max(errors.values()), "worst": max(errors, key=errors.get), "params": len(errors),
            "scale_error": errors.get("logit_scale_log", 1.0), "bias_error": errors.get("logit_bias", 1.0),
            "loss_error": abs(logged.loss.item() - ref.item()) / ref.item()}


def _sigmoid_cached_checks(rank, world_size):
    """DGA's cached SigLIP gradients in fp64: rows gathered and (scale, bias) shares, as an engine averages them over
    ranks, equal the dense ones."""
    from zvl_ds.runtime.dist import gather_no_grad
    from zvl_ds.objective.sigmoid_loss import sigmoid_loss_and_grads

    per_rank, dim = 5, 4
    batch = per_rank * world_size
    gen = torch.Generator().manual_seed(7)
    image = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1)
    local = slice(rank * per_rank, (rank + 1) * per_rank)
    params = torch.tensor([10.0, -10.0], dtype=torch.float64)
    cached = sigmoid_loss_and_grads(image[local], text[local], params, chunk_rows=2, chunk_cols=3)
    averaged_params = cached.loss_params.clone()  # as the engine averages them over ranks
    dist.all_reduce(averaged_params)
    averaged_params /= world_size
    ref_image, ref_text, ref_params = (x.clone().requires_grad_(True) for x in (image, text, params))
    ref = dense_sigmoid_loss(ref_image, ref_text, ref_params[0], ref_params[1])
    grads = torch.autograd.grad(ref, [ref_image, ref_text, ref_params])
    sims, hard = image @ text.t(), torch.arange(batch)
    return {"image": _rel_error(gather_no_grad(cached.image) / world_size, grads[0]),
            "text": _rel_error(gather_no_grad(cached.text) / world_size, grads[1]),
            "scale_bias": _rel_error(averaged_params, grads[2]),
            "loss": abs(cached.output.loss.item() - ref.item()) / ref.item(),
            "i2t_acc": abs(cached.output.i2t_acc - (sims.argmax(1) == hard).double().mean().item()),
            "t2i_acc": abs(cached.output.t2i_acc - (sims.argmax(0) == hard).double().mean().item())}


# ---------------------------------------------------------------------------------------------- tests


def _all_checks(rank, world_size):
    return {"gather": _gather_checks(rank, world_size), "model": _model_checks(rank, world_size),
            "cached": _cached_grad_checks(rank, world_size), "ties": _tied_accuracy_checks(rank, world_size),
            "sigmoid_model": _sigmoid_model_checks(rank, world_size),
            "sigmoid_cached": _sigmoid_cached_checks(rank, world_size)}


@pytest.fixture(scope="module", params=[2, 3], ids=["2_ranks", "3_ranks"])
def results(request):
    return request.param, run_distributed(_all_checks, request.param, timeout=240, use_deepspeed=False)


def test_gather_with_grad_forward_backward_and_plain_gather(results):
    _, per_rank = results
    for report in per_rank:
        checked = report["gather"]
        assert checked["forward"] and checked["backward"], checked
        assert checked["plain_forward"] and checked["plain_detached"], checked
        assert "same tensor shape on every rank" in checked["mismatch_message"]


@pytest.mark.parametrize("case", ["nce", "mixup_image", "mixup_text", "nce_tiled", "mixup_text_tiled"])
def test_gather_backward_gradients_equal_full_batch(results, case):
    _, per_rank = results
    for report in per_rank:
        checked = report["model"][case]
        assert checked["params"] > 20  # towers, projections and the temperature
        assert checked["max_error"] <= TOLERANCE, checked
        assert checked["tau_error"] <= TOLERANCE, checked
        assert not checked["zero_ref_mismatch"], checked
        assert checked["loss_error"] <= 1e-5, checked


@pytest.mark.parametrize("case", ["nce_gather_backward_off", "mixup_image_gather_backward_off",
                                  "nce_gather_backward_off_tiled"])
def test_gather_backward_off_equals_detached_key_reference(results, case):
    _, per_rank = results
    for report in per_rank:
        checked = report["model"][case]
        assert checked["max_error"] <= TOLERANCE, checked
        assert checked["distance_from_full"] > 1e-2, checked  # really a different gradient


def test_cached_gradients_sum_over_ranks_to_full_batch_gradient(results):
    world_size, per_rank = results
    first = per_rank[0]["cached"]
    for report in per_rank:
        for key, checked in report["cached"].items():
            if key.endswith("default_partner_loss"):
                assert checked <= 1e-6, (key, checked)
                continue
            assert checked["finite"], key
            for field in ("image", "text", "tau"):
                assert checked[field] <= 1e-10, (key, field, checked)
            assert checked["loss"] <= 1e-6, (key, checked)  # the logged loss is fp32
            assert checked["i2t_acc"] == 0 and checked["t2i_acc"] == 0, (key, checked)
            assert checked["logged_loss"] == first[key]["logged_loss"]  # identical on every rank
    # the temperature gradient is a share per rank, not a copy: the shares differ
    shares = {report["cached"]["nce_tau0.05"]["local_tau_share"] for report in per_rank}
    assert len(shares) == world_size


def test_tiled_accuracy_with_ties_across_ranks_is_argmax(results):
    _, per_rank = results
    for report in per_rank:
        want = report["ties"]["want"]
        assert 0 < want[0] < 1 and 0 < want[1] < 1
        for tiles, got in report["ties"]["got"].items():
            assert got == pytest.approx(want, abs=1e-12), (tiles, got, want)


def test_sigmoid_gather_backward_gradients_equal_full_batch(results):
    _, per_rank = results
    for report in per_rank:
        checked = report["sigmoid_model"]
        print("sigmoid gather-backward worst relative error", checked["max_error"], checked["worst"])
        assert checked["params"] > 20  # towers, projections, scale and bias
        assert checked["max_error"] <= TOLERANCE, checked
        assert checked["scale_error"] <= TOLERANCE and checked["bias_error"] <= TOLERANCE, checked
        assert checked["loss_error"] <= 1e-5, checked


def test_sigmoid_cached_gradients_sum_over_ranks_to_full_batch_gradient(results):
    _, per_rank = results
    for report in per_rank:
        checked = report["sigmoid_cached"]
        print("sigmoid cached worst relative error", max(checked[f] for f in ("image", "text", "scale_bias")))
        for field in ("image", "text", "scale_bias"):
            assert checked[field] <= 1e-10, (field, checked)
        assert checked["loss"] <= 1e-6, checked
        assert checked["i2t_acc"] == 0 and checked["t2i_acc"] == 0, checked
