"""Zero-shot image-text retrieval: ``metrics`` (pure recalls), ``embed`` (every rank, ZeRO-3-safe), ``grid``
(TensorBoard examples) and ``evaluation`` (every validation set of a config)."""
