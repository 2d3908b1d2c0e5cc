"""The training objective and the exact optimizer step: the softmax (``NCE``, ``MixUpNCE``) and sigmoid (``SigLIP``)
losses, their dense reference, the mixup draw, and the step runners (DGA and single pass) with the skip policy."""
