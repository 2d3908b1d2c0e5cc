"""clip_benchmark's own command line, with the same arguments, where its console script cannot run:

  python -m zvl_ds.run_clip_benchmark eval --model_type open_clip --model local-dir:exported/demo_open_clip \\
      --pretrained "" --dataset wds/demo_val --dataset_root clip_benchmark/demo_val --task zeroshot_retrieval

Two things stop ``clip_benchmark eval`` in the environment tools/install.sh makes, and this module fixes only them:

- on a CPU machine, PyPI's torchvision is a CUDA build that does not import next to a CPU torch (``operator
  torchvision::nms does not exist``); importing zvl_ds first puts its torchvision shim in place (docs/install.md);
- with numpy 2.4 or later, clip_benchmark 1.6.2's zero-shot ``accuracy()`` converts a one-element array with
  ``float()``, which numpy refuses (``only 0-dimensional arrays can be converted``, LAION-AI/CLIP_benchmark issue
  147); there the same top-k hits are counted without that conversion.

Everything else (model loading, transforms, prompts, logits, metrics, the output JSON) is clip_benchmark's own.
"""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence

import zvl_ds  # noqa: F401  (its torchvision shim, before clip_benchmark imports open_clip and torchvision)
from zvl_ds.base.cli import run
from zvl_ds.base.errors import UserError

PROG = "python -m zvl_ds.run_clip_benchmark"


def top_k_accuracy(output, target, topk: Sequence[int] = (1,)) -> List[float]:
    """clip_benchmark's ``accuracy()``: per k, the fraction of rows whose target class is among its k largest
    logits (ties as ``torch.topk`` breaks them)."""
    predicted = output.topk(max(topk), 1, True, True)[1].t()
    correct = predicted.eq(target.view(1, -1).expand_as(predicted))
    return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]


def numpy_refuses_one_element_arrays() -> bool:
    """Whether ``float()`` of a one-element array raises, as from numpy 2.4 on."""
    import numpy

    try:
        float(numpy.zeros(1))
    except TypeError:
        return True
    return False


def main(argv: Optional[List[str]] = None) -> int:
    try:
        from clip_benchmark import cli as benchmark_cli
        from clip_benchmark.metrics import zeroshot_classification
    except ImportError as error:
        raise UserError(f"{PROG} needs the optional extra clip_benchmark ({error}): pip install -c constraints.txt "
                        f"-e \".[clip-benchmark]\", or bash tools/install.sh --test") from None
    if numpy_refuses_one_element_arrays():
        zeroshot_classification.accuracy = top_k_accuracy
    given = sys.argv
    sys.argv = [PROG, *(given[1:] if argv is None else argv)]  # clip_benchmark's parser reads sys.argv
    try:
        benchmark_cli.main()
    finally:
        sys.argv = given
    return 0


def cli() -> int:
    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
