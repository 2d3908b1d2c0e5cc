"""``python -m zvl_ds.bench.run_footprint``: the figures it reads from a run folder, against a folder written here
with known contents (a ZeRO-0 checkpoint's optimizer state, the files' sizes, the last evaluation)."""
import json
import os

import torch

from zvl_ds.bench.run_footprint import footprint, markdown
from zvl_ds.config import load_config


def test_footprint_of_a_written_run(tmp_path):
    run = tmp_path / "run"
    folder = run / "step_00000003"
    folder.mkdir(parents=True)
    cfg = load_config(None, ["model.arch=tiny", "data.batch_size=8"])
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "latest").write_text("step_00000003")
    # two parameters of 6 and 4 elements under AdamW: two moments each, and a step count
    state = {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(6), "exp_avg_sq": torch.zeros(6)},
             1: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2, 2), "exp_avg_sq": torch.zeros(2, 2)}}
    torch.save({"module": {"w": torch.zeros(10)}, "optimizer": {"state": state, "param_groups": []}},
               folder / "mp_rank_00_model_states.pt")
    (folder / "notes.json").write_text("{}")
    rows = [{"step": 3, "demo_val": {"rsum": 123.4, "i2t_r1": 1.0}, "demo_val_ema": {"rsum": 99.0},
             "shapes": {"top1": 55.0}}]
    (run / "eval_metrics.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    found = footprint(str(run))
    assert found["trainable"] == 10
    assert found["optimizer_bytes"] == (2 * 6 + 2 * 4 + 2) * 4
    assert found["checkpoint_bytes"] == sum(os.path.getsize(folder / name) for name in os.listdir(folder))
    assert found["step_seconds"] is None  # no TensorBoard events in this folder
    assert found["demo_val/rsum"] == 123.4 and found["shapes/top1"] == 55.0 and "demo_val_ema/rsum" not in found
    table = markdown([found])
    assert "| run | 10 | 0.00 MiB |" in table and "| 123.4 | 55.0 |" in table
