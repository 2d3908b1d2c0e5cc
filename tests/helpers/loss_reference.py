"""The dense full-batch losses the loss tests compare against (plain autograd, no chunking): symmetric InfoNCE
and the pairwise sigmoid loss."""
import torch
import torch.nn.functional as F


def reference_loss(image, text, tau, lam=None, partner=None, detach_keys=False):
    """Global-mean symmetric InfoNCE with soft targets Y = lam*I + (1-lam)*P, on full B x B logits."""
    batch = image.shape[0]
    targets = torch.eye(batch, dtype=image.dtype)
    if lam is not None:
        swap = torch.zeros(batch, batch, dtype=image.dtype)
        swap[torch.arange(batch), partner] = 1.0
        targets = lam * targets + (1 - lam) * swap
    image_keys = image.detach() if detach_keys else image
    text_keys = text.detach() if detach_keys else text
    i2t = -(targets * F.log_softmax(image @ text_keys.t() / tau, dim=1)).sum(dim=1)
    t2i = -(targets * F.log_softmax(text @ image_keys.t() / tau, dim=1)).sum(dim=1)
    return (0.5 * (i2t + t2i)).mean()


def reference_sigmoid_loss(image, text, scale, bias):
    """Mean over all B x B pairs of -log sigmoid(z_ij (scale <x_i, y_j> + bias)), z = +1 on the diagonal."""
    batch = image.shape[0]
    signs = 2 * torch.eye(batch, dtype=image.dtype) - 1
    return -F.logsigmoid(signs * (scale * image @ text.t() + bias)).mean()
