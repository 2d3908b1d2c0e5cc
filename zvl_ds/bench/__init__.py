"""Benchmarks, run as ``python -m zvl_ds.bench {shards,data,loss,dga,memory,gpu,profile,openclip,max-chunk,all}``.

One module per subject: ``data`` (shard writer images/s, training loader samples/s), ``loss`` (memory and time
of the loss kernels vs the dense B x B loss), ``step`` (DGA vs single pass, memory vs global batch, GPU MFU,
step profile, OpenCLIP's accum-freq step, the largest chunk that fits), with their helpers ``step_profile``
and ``openclip_step``; ``fresh_process`` runs one measurement in a new interpreter so that its memory peak is
its own. ``gpu_report`` (``gpu-report``) runs every GPU measurement in one timed call: its stages measure zvl_ds's
step (``gpu_report_step``) or run another program (``gpu_report_programs``: OpenCLIP's own training loop from
``openclip_train``, ``verify_exactness``), and ``gpu_table`` turns its report into README's GPU table. Nothing in
the training path imports this package.
"""
