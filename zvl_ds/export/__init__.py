"""A run's checkpoint out to a model folder: ``consolidate`` (fp32 weights from any ZeRO stage, training side),
``model_folder`` (write a folder and ``load_model`` it back, with no DeepSpeed or training code), and the command
``python -m zvl_ds.export`` (``__main__``)."""


def __getattr__(name: str):
    if name in ("main", "cli", "build_parser"):  # the command's functions, as ``zvl_ds.export`` had them
        from zvl_ds.export import __main__ as command

        return getattr(command, name)
    raise AttributeError(f"module 'zvl_ds.export' has no attribute {name!r}")
