"""Optimizer parameter groups: what is exempt from weight decay."""
from zvl_ds.config import load_config
from zvl_ds.runtime.optim import parameter_groups


def test_no_decay_group_holds_biases_norms_and_temperature():
    from zvl_ds.model.build import build_model

    cfg = load_config(None, ["model.arch=tiny", "loss.temperature.name=parameter"])
    model = build_model(cfg.model, cfg.loss)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["group_name"]: [names[id(p)] for p in g["params"]] for g in parameter_groups(model, 0.1, False)}
    assert "tau" in groups["no_decay"] and "image_tower.pos_embed" in groups["no_decay"]
    assert all(n.endswith("bias") or "norm" in n.lower() or "position_embeddings" in n or n in ("tau", "image_tower.pos_embed",
                                                                   "image_tower.cls_token")
               for n in groups["no_decay"])
    assert "image_projection.weight" in groups["decay"]
    (everything,) = parameter_groups(model, 0.1, True)
    assert len(everything["params"]) == sum(1 for p in model.parameters() if p.requires_grad)
