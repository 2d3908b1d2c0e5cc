"""The ``distill:`` section: a frozen teacher's view of the whole global batch as a second loss term
(docs/distillation.md); with the checks that concern this section alone. Distillation is off unless
``distill.teacher`` is set.

The rules that span sections (no MixUpNCE, gather-backward for the single-pass runner) are ``Config``'s
(``schema.py``). The teacher itself is resolved and loaded when a run starts (``zvl_ds.model.teacher``), not when the
config loads: a run's saved config must stay readable (export, evaluation) after its teacher has moved.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, Optional

from zvl_ds.base.errors import ConfigError

SOURCES = ("online", "stored")
SIGMOID_TARGETS = ("bce", "mobileclip2")


@dataclass
class DistillConfig:
    teacher: Optional[str] = None
    """The teacher: a zvl_ds model folder (`python -m zvl_ds.export`), a Hugging Face `CLIPModel` / `SiglipModel`
    folder, an OpenCLIP `local-dir:FOLDER`, or an OpenCLIP architecture name with its weights in `distill.pretrained`.
    Nothing is downloaded and no code from a folder runs. `null`: no distillation (the default).
    """
    pretrained: Optional[str] = None
    """OpenCLIP architecture names only: the local weights file of the teacher (a teacher needs trained weights)."""
    source: Literal["online", "stored"] = "online"
    """`online`: the teacher embeds each step's global batch in pass 1 (its own tokenizer and image size); `stored`:
    its embeddings written beside the shards once (`python -m zvl_ds.reinforce_shards`; the image embedding is of its
    evaluation view, not of the training crop), read with each batch; the teacher is never loaded, its weights are
    only hashed to check that the embeddings are its own.
    """
    weight: float = 1.0
    """Weight of the distillation term in the loss: `contrastive_weight * L_student + weight * L_distill`."""
    contrastive_weight: float = 1.0
    """Weight of the student's own loss (`loss.name`); 0: pure distillation, as MobileCLIP2 trains."""
    scale: Optional[float] = None
    """The teacher's logit scale: the number its cosine similarities are multiplied by (CLIP's `exp(logit_scale)`,
    e.g. 100). `null`: the teacher's own.
    """
    bias: Optional[float] = None
    """Sigmoid distillation (`loss.name: SigLIP`) only: the teacher's logit bias. `null`: the teacher's own (a softmax
    teacher has none: set it).
    """
    sigmoid_target: Literal["bce", "mobileclip2"] = "bce"
    """Sigmoid distillation only. `bce`: the pairwise binary cross-entropy of the student's logit u against the
    teacher's probability `sigmoid(v)`; `mobileclip2`: the formulation of MobileCLIP2's published code
    (`DistillSigLipLoss`), `-log sigmoid(y u)` with the soft sign `y = 2 sigmoid(v) - 1` of the teacher's logit v.
    """

    @property
    def enabled(self) -> bool:
        return self.teacher is not None

    def check(self) -> None:
        if not self.enabled:
            self._check_unused()
            return
        if not str(self.teacher).strip():
            raise ConfigError("distill.teacher: empty; give a model folder, local-dir:FOLDER or an OpenCLIP name, or "
                              "null for no distillation")
        for key in ("weight", "contrastive_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"distill.{key}: must be >= 0, got {getattr(self, key)}")
        if self.weight == 0:
            raise ConfigError("distill.weight=0 with distill.teacher set: the teacher would run for nothing; remove "
                              "distill.teacher to train without it")
        if self.scale is not None and self.scale <= 0:
            raise ConfigError(f"distill.scale: must be > 0 (it multiplies the teacher's similarities), got "
                              f"{self.scale}")

    def _check_unused(self) -> None:
        """Keys set without a teacher would be ignored in silence: refused, naming the first."""
        defaults = DistillConfig(teacher=None)
        changed = [item.name for item in fields(self) if getattr(self, item.name) != getattr(defaults, item.name)]
        if changed:
            raise ConfigError(f"distill.{changed[0]} is set but distill.teacher is not: set the teacher, or remove "
                              f"the distill.{changed[0]} key")
