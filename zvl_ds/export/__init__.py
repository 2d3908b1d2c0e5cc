"""A run's checkpoint out to a model folder another tool loads, and nothing else: export only writes. The formats by
name (``formats``: zvl_ds's own ``model_folder``, open_clip's ``local-dir:`` folders, Hugging Face folders) and the
command ``python -m zvl_ds.export`` (``__main__``). Reading runs and model folders back is the model room's
(``zvl_ds.model.saved_run``, ``zvl_ds.model.inference``)."""

