"""Learning-rate schedules (ZeroVL cosine, LAVIS cosine and step) against hand-computed values."""
import math

import pytest

from zvl_ds.config import load_config
from zvl_ds.runtime.schedule import learning_rate


def test_zerovl_cosine_schedule_hand_computed():
    cfg = load_config(None, ["optim.lr.init=1e-4", "optim.lr.warmup_proportion=0.1"]).optim.lr
    total = 100  # warm-up int(100 * 0.1) = 10 steps
    assert learning_rate(cfg, 0, total, 10) == 0.0
    assert learning_rate(cfg, 5, total, 10) == pytest.approx(0.5e-4)
    assert learning_rate(cfg, 10, total, 10) == pytest.approx(1e-4)  # start of the cosine: scale 1
    # half way through the cosine: m + (1 - m) * 0.5 * (1 + cos(pi/2)) with m = 0.1
    assert learning_rate(cfg, 55, total, 10) == pytest.approx(1e-4 * (0.1 + 0.9 * 0.5))
    assert learning_rate(cfg, 100, total, 10) == pytest.approx(1e-4 * 0.1)  # ends at min_lr_scale


def test_lavis_schedules_hand_computed():
    cosine = load_config(None, ["optim.lr.name=linear_warmup_cosine_lr", "optim.lr.init=1.0", "optim.lr.min_lr=0.1",
                                "optim.lr.warmup_lr=0.0", "optim.lr.warmup_steps=4"]).optim.lr
    assert learning_rate(cosine, 2, 100, 10) == pytest.approx(0.5)
    assert learning_rate(cosine, 50, 100, 10) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    step = load_config(None, ["optim.lr.name=linear_warmup_step_lr", "optim.lr.init=1.0", "optim.lr.min_lr=0.3",
                              "optim.lr.lr_decay_rate=0.5", "optim.lr.warmup_steps=0"]).optim.lr
    assert [learning_rate(step, s, 100, 10) for s in (0, 9, 10, 25, 99)] == pytest.approx([1, 1, 0.5, 0.3, 0.3])
