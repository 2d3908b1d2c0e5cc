"""OpenCLIP's accum-freq step as benchmarked: its loss is symmetric InfoNCE, and one step applies the full-batch
gradient (the bench itself, on the tiny model under DeepSpeed: tests/dist/test_openclip_bench.py)."""
import pytest
import torch

from zvl_ds.config import load_config
from zvl_ds.objective.dense_reference import dense_contrastive_loss


def test_clip_loss_copy_is_symmetric_infonce_with_a_multiplied_scale():
    from zvl_ds.bench.openclip_step import clip_loss_copy

    generator = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator, dtype=torch.float64), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator, dtype=torch.float64), dim=-1)
    tau = torch.tensor([0.07], dtype=torch.float64)
    assert float(clip_loss_copy(image, text, 1.0 / tau)) == pytest.approx(
        float(dense_contrastive_loss(image, text, tau)), rel=1e-12)


def test_accum_freq_step_applies_the_full_batch_gradient():
    from zvl_ds.model.build import build_model
    from zvl_ds.bench.openclip_step import accum_freq_step, clip_loss_copy

    cfg = load_config(None, ["model.arch=tiny", "loss.temperature.name=parameter", "loss.temperature.value=0.1",
                             "model.text_encoder.config.hidden_dropout_prob=0.0",
                             "model.text_encoder.config.attention_probs_dropout_prob=0.0"])
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(12, 3, 32, 32, generator=generator)
    input_ids = torch.randint(5, 200, (12, 25), generator=generator)
    mask = (torch.arange(25)[None, :] < torch.randint(3, 26, (12,), generator=generator)[:, None]).long()
    params = {}
    for way in ("accum_freq", "full_batch"):
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.loss).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        if way == "accum_freq":
            micro = [(images[i:i + 4], input_ids[i:i + 4], mask[i:i + 4]) for i in range(0, 12, 4)]
            accum_freq_step(model, optimizer, micro, clip_loss_copy)
        else:
            out = model(images=images, input_ids=input_ids, attention_mask=mask)
            dense_contrastive_loss(out["image_embeds"], out["text_embeds"], out["temperature"]).backward()
            optimizer.step()
        params[way] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, value in params["full_batch"].items():
        if name != "tau":
            torch.testing.assert_close(params["accum_freq"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    # as in open_clip, every micro-batch's backward adds the whole loss's gradient of the scale: with SGD the
    # temperature moves accum_freq (3) times as far as the full-batch gradient says
    full_move = params["full_batch"]["tau"] - 0.1
    assert abs(float(full_move)) > 1e-4
    torch.testing.assert_close(params["accum_freq"]["tau"] - 0.1, 3 * full_move, rtol=1e-4, atol=1e-7)
