"""python -m zvl_ds.run_clip_benchmark: clip_benchmark's CLI with its arguments untouched, the zero-shot top-k count
replaced only where numpy refuses clip_benchmark's own, equal to a count by hand, and a clear error without the
extra. (docs/use-elsewhere.md's commands run it end to end: tests/e2e/test_documented_commands.py.)"""
import sys

import pytest
import torch

from zvl_ds.base.errors import UserError
from zvl_ds.run_clip_benchmark import main, numpy_refuses_one_element_arrays, top_k_accuracy


def counted_by_hand(logits, targets, k):
    hits = 0
    for row, target in zip(logits.tolist(), targets.tolist()):
        ranked = sorted(range(len(row)), key=lambda column: -row[column])
        hits += target in ranked[:k]
    return hits / len(targets)


def test_top_k_accuracy_counts_as_by_hand():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 9, generator=generator)
    targets = torch.randint(0, 9, (37,), generator=generator)
    assert top_k_accuracy(logits, targets, topk=(1, 5)) == [counted_by_hand(logits, targets, 1),
                                                            counted_by_hand(logits, targets, 5)]
    assert top_k_accuracy(torch.eye(4), torch.tensor([0, 1, 3, 3]), topk=(1,)) == [0.75]


def test_numpy_check_agrees_with_clip_benchmarks_own_count():
    pytest.importorskip("clip_benchmark")
    from clip_benchmark.metrics.zeroshot_classification import accuracy

    logits, targets = torch.eye(4), torch.tensor([0, 1, 3, 3])
    if numpy_refuses_one_element_arrays():
        with pytest.raises(TypeError, match="0-dimensional"):
            accuracy(logits, targets, topk=(1,))
    else:
        assert accuracy(logits, targets, topk=(1,)) == top_k_accuracy(logits, targets, topk=(1,))


@pytest.mark.parametrize("refuses", [True, False])
def test_the_count_is_replaced_only_where_numpy_refuses_and_the_arguments_reach_clip_benchmark(monkeypatch, refuses):
    pytest.importorskip("clip_benchmark")
    from clip_benchmark import cli
    from clip_benchmark.metrics import zeroshot_classification

    original = zeroshot_classification.accuracy
    monkeypatch.setattr(zeroshot_classification, "accuracy", original)  # restored after the test
    monkeypatch.setattr("zvl_ds.run_clip_benchmark.numpy_refuses_one_element_arrays", lambda: refuses)
    seen = []
    monkeypatch.setattr(cli, "main", lambda: seen.append(list(sys.argv)))
    argv_before = list(sys.argv)
    assert main(["eval", "--dataset", "wds/x", "--pretrained", ""]) == 0
    assert seen == [["python -m zvl_ds.run_clip_benchmark", "eval", "--dataset", "wds/x", "--pretrained", ""]]
    assert sys.argv == argv_before
    assert (zeroshot_classification.accuracy is top_k_accuracy) == refuses
    assert (zeroshot_classification.accuracy is original) != refuses


def test_without_the_extra_the_error_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "clip_benchmark", None)  # import clip_benchmark raises ImportError
    with pytest.raises(UserError, match=r"optional extra clip_benchmark .*\.\[clip-benchmark\]"):
        main(["eval"])
