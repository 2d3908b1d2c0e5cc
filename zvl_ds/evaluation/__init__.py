"""Evaluation: retrieval (``metrics``: pure recalls; ``embed``: every rank, ZeRO-3-safe; ``grid``: the examples
image; ``retrieval``: every validation set of a config) and zero-shot classification (``zero_shot``)."""
