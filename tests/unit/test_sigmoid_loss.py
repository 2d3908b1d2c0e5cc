"""Single-process checks of the tiled sigmoid (SigLIP) loss against the dense fp64 reference in zvl_ds.objective.dense_reference.

Multi-process (gather-backward) checks live in tests/test_dist_gather.py, DGA ones in tests/test_dga_exactness.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from zvl_ds.objective.dense_reference import dense_sigmoid_loss
from zvl_ds.config import ConfigError, load_config
from zvl_ds.objective.sigmoid_loss import sigmoid_loss, sigmoid_loss_and_grads


def leaves(batch=11, dim=6, scale=10.0, bias=-10.0, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=gen, dtype=dtype), dim=1).requires_grad_(True)
    text = F.normalize(torch.randn(batch, dim, generator=gen, dtype=dtype), dim=1).requires_grad_(True)
    log_scale = torch.tensor([math.log(scale)], dtype=dtype, requires_grad=True)
    bias = torch.tensor([bias], dtype=dtype, requires_grad=True)
    return image, text, log_scale, bias


def relative_error(actual, expected):
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-12))


def test_hand_computed_two_pairs():
    # x = y = identity rows, t = 2, b = -1: diagonal logits 1 (positive), off-diagonal -1 (negative);
    # every pair costs -log sigmoid(1) = log(1 + e^-1)
    image = torch.eye(2, dtype=torch.float64)
    loss, output = sigmoid_loss(image, image.clone(), torch.tensor([2.0, -1.0], dtype=torch.float64))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-12)
    assert output.loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert (output.i2t_acc, output.t2i_acc) == (1.0, 1.0)


def test_accuracy_counts_rows_and_columns_separately():
    # similarities [[1.0, 0.0], [0.8, 0.6]]: row 1 prefers text 0, so i2t = 1/2; column 0's best is image 0
    # (1.0 vs 0.8) and column 1's is image 1 (0.6 vs 0.0), so t2i = 2/2
    image = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    _, output = sigmoid_loss(image, text, torch.tensor([1.0, 0.0]), chunk_rows=1, chunk_cols=1)
    assert (output.i2t_acc, output.t2i_acc) == (0.5, 1.0)


@pytest.mark.parametrize("chunk_rows,chunk_cols", [(1024, 0), (1, 1), (4, 3), (5, 7), (13, 0), (6, 100)])
def test_loss_and_all_gradients_equal_dense_fp64_reference(chunk_rows, chunk_cols):
    image, text, log_scale, bias = leaves(batch=13, seed=2)
    loss, _ = sigmoid_loss(image, text, torch.cat([log_scale.exp(), bias]), chunk_rows=chunk_rows,
                           chunk_cols=chunk_cols)
    grads = torch.autograd.grad(loss, [image, text, log_scale, bias])
    ref = dense_sigmoid_loss(image, text, log_scale.exp(), bias)
    ref_grads = torch.autograd.grad(ref, [image, text, log_scale, bias])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    for got, want in zip(grads, ref_grads):
        assert relative_error(got, want) <= 1e-10  # measured <= 1e-15


def test_cached_gradients_equal_autograd_and_detach():
    image, text, log_scale, bias = leaves(batch=12, scale=5.0, bias=-2.0, seed=5)
    scale_bias = torch.cat([log_scale.exp(), bias])
    cached = sigmoid_loss_and_grads(image, text, scale_bias, chunk_rows=5, chunk_cols=4)
    ref = dense_sigmoid_loss(image, text, scale_bias[0], scale_bias[1])
    ref_image, ref_text, ref_params = torch.autograd.grad(ref, [image, text, scale_bias])
    assert cached.output.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert relative_error(cached.image, ref_image) <= 1e-10
    assert relative_error(cached.text, ref_text) <= 1e-10
    assert cached.loss_params.shape == (2,)
    assert relative_error(cached.loss_params, ref_params) <= 1e-10
    assert image.grad is None and log_scale.grad is None


def test_stable_at_large_logits_in_fp32():
    # t = 1000, b = 500: logits up to 1500 make exp overflow in fp32; softplus / sigmoid stay finite
    image, text, log_scale, bias = leaves(batch=16, dim=8, scale=1000.0, bias=500.0, dtype=torch.float32, seed=7)
    scale_bias = torch.cat([log_scale.exp(), bias]).detach()
    cached = sigmoid_loss_and_grads(image, text, scale_bias, chunk_rows=3, chunk_cols=5)
    for tensor in (cached.output.loss, cached.image, cached.text, cached.loss_params):
        assert torch.isfinite(tensor).all()
    image64, text64 = image.detach().double().requires_grad_(True), text.detach().double().requires_grad_(True)
    params64 = scale_bias.double().requires_grad_(True)
    ref = dense_sigmoid_loss(image64, text64, params64[0], params64[1])
    ref_grads = torch.autograd.grad(ref, [image64, text64, params64])
    assert cached.output.loss.item() == pytest.approx(ref.item(), rel=1e-4)
    for got, want in zip((cached.image, cached.text, cached.loss_params), ref_grads):
        assert relative_error(got.double(), want) <= 1e-4
    assert torch.isinf(torch.exp(torch.tensor(1500.0)))  # why a naive sigmoid / log would fail here


def test_tile_sizes_agree_in_fp32():
    image, text, log_scale, bias = leaves(batch=40, dim=16, dtype=torch.float32, seed=3)
    scale_bias = torch.cat([log_scale.exp(), bias]).detach()
    whole = sigmoid_loss_and_grads(image, text, scale_bias, chunk_rows=1000)
    for chunk_rows, chunk_cols in ((1, 1), (7, 3), (7, 11), (40, 40)):
        tiled = sigmoid_loss_and_grads(image, text, scale_bias, chunk_rows=chunk_rows, chunk_cols=chunk_cols)
        # the loss sums B^2 = 1600 fp32 terms in a tile-dependent order: measured 1.1e-6 apart
        assert tiled.output.loss.item() == pytest.approx(whole.output.loss.item(), rel=5e-6)
        for field in ("image", "text", "loss_params"):
            assert relative_error(getattr(tiled, field), getattr(whole, field)) <= 1e-5


def test_bad_inputs_are_named():
    image, text, log_scale, bias = leaves(batch=4)
    params = torch.cat([log_scale.exp(), bias])
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        sigmoid_loss(image, text, log_scale)
    with pytest.raises(ValueError, match="same shape"):
        sigmoid_loss(image, text[:3], params)
    with pytest.raises(ValueError, match="chunk_cols"):
        sigmoid_loss(image, text, params, chunk_cols=-1)


def test_model_holds_log_scale_and_bias_as_no_decay_parameters():
    from zvl_ds.model.build import build_model
    from zvl_ds.runtime.optim import uses_weight_decay

    cfg = load_config(None, ["model.arch=tiny", "loss.name=SigLIP", "loss.sigmoid.scale_init=8.0",
                             "loss.sigmoid.bias_init=-5.0"])
    model = build_model(cfg.model, cfg.loss)
    params = dict(model.named_parameters())
    assert params["logit_scale_log"].item() == pytest.approx(math.log(8.0))
    assert params["logit_bias"].item() == -5.0
    assert not any(uses_weight_decay(name, params[name]) for name in ("logit_scale_log", "logit_bias"))
    scale_bias = model.logit_scale_bias()
    assert scale_bias.tolist() == pytest.approx([8.0, -5.0])
    scale_bias.sum().backward()  # d(t + b)/d(log t) = t
    assert params["logit_scale_log"].grad.item() == pytest.approx(8.0)
    assert "logit_scale_log" in model.state_dict() and "logit_bias" in model.state_dict()
    softmax_cfg = load_config(None, ["model.arch=tiny"])
    assert build_model(softmax_cfg.model, softmax_cfg.loss).logit_scale_bias() is None


@pytest.mark.parametrize("overrides,message", [
    (["loss.sigmoid.scale_init=0"], "loss.sigmoid.scale_init"),
    (["loss.nce_loss.gather_backward=false"], "gather_backward"),
    (["loss.temperature.name=parameter"], "temperature"),
    (["loss.chunk_cols=-2"], "loss.chunk_cols"),
])
def test_bad_sigmoid_configs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["loss.name=SigLIP"] + overrides)


def test_siglip_recipe_loads():
    cfg = load_config("configs/clip/siglip_dga.yaml", [])
    assert cfg.loss.name == "SigLIP" and cfg.runner.name == "clip_bsgs" and cfg.loss.chunk_cols > 0


def test_exported_siglip_model_keeps_scale_and_bias(tmp_path):
    from zvl_ds.data import load_tokenizer
    from zvl_ds.export.model_folder import write_model_folder
    from zvl_ds.model.inference import load_model
    from zvl_ds.model.build import build_model

    cfg = load_config(None, ["model.arch=tiny", "loss.name=SigLIP", "loss.sigmoid.bias_init=-4.0"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss)
    with torch.no_grad():
        model.logit_scale_log.fill_(1.5)  # "trained" values, not the initial ones
        model.logit_bias.fill_(-6.25)
    folder = write_model_folder(str(tmp_path / "model"), cfg, model, load_tokenizer(cfg.model.text_encoder),
                                {"run": "test"})
    loaded = load_model(folder)
    params = dict(loaded.model.named_parameters())
    assert params["logit_scale_log"].item() == 1.5 and params["logit_bias"].item() == -6.25
