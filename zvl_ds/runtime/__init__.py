"""What a run stands on: processes and gathers (``dist``), the DeepSpeed engine with its optimizer and schedule,
checkpoints, metrics (``monitor``), logging, atomic writes, and the user-error exit path (``errors``, ``cli``).

Importing this package loads nothing heavy: inference imports ``runtime.errors`` without DeepSpeed.
"""
