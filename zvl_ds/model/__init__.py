"""The dual encoder and everything that builds, loads or reads it.

From the ground up: ``towers`` (a timm image tower, a Hugging Face text tower, projections) <- ``dual_encoder``
(the module) <- ``sources`` with ``hf_clip`` and ``open_clip_towers`` (another library's whole model as towers) <-
``build`` (``build_model``: the one dispatch). Beside them: ``locking``, ``patch_dropout``, ``mixing`` (the mixup
that happens inside a forward), ``weights_files`` and ``safe_load`` (reading weights as data), ``init_weights``
(a fresh run's weights from a file or a saved run), ``saved_run`` (a run's checkpoint back to a model),
``inference`` (an exported model folder back to a model: ``load_model``) and ``teacher`` (a distillation teacher,
frozen: any of the above that zvl_ds loads).
"""
