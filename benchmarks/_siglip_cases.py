"""What the SigLIP benchmarks measure (shared by test_siglip_bench.py, siglip_targets.py and
gpu_siglip_check.py): one forward+backward of SigLIP's sigmoid loss on (image, text) of shape
(N, D), gradients for image, text, logit_scale and logit_bias (SigLIP learns both).

    "fastcontrast[<backend>]"  fastcontrast's siglip_loss (tiles, recomputing backward)
    "materialised"             OpenCLIP's SigLipLoss at world size 1, written out:
                               logits = scale * image @ text.T + bias (N x N), labels 2 I - 1,
                               loss = -logsigmoid(labels * logits).sum() / N
    "chunked autograd"         the same in row chunks of 1024 under plain autograd: the forward
                               never holds all logits at once, but autograd keeps every chunk's
                               logits for the backward, so the peak is the materialised one

Inputs: L2-normalised rows, text i correlated with image i; scale 10, bias -10 (SigLIP's
initialisation).
"""
import torch
import torch.nn.functional as F

from fastcontrast import siglip_loss

SCALE, BIAS = 10.0, -10.0
CHUNK_ROWS = 1024
IMPLEMENTATIONS = ("fastcontrast[cpu]", "fastcontrast[torch]", "fastcontrast[triton]",
                   "materialised", "chunked autograd")


def materialised_siglip(image, text, logit_scale, logit_bias):
    """OpenCLIP's SigLipLoss (single process): the N x N logits and their autograd graph."""
    logits = logit_scale * image @ text.T + logit_bias
    labels = 2 * torch.eye(image.shape[0], dtype=logits.dtype, device=logits.device) - 1
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]


def chunked_autograd_siglip(image, text, logit_scale, logit_bias):
    """The materialised formula row chunk by row chunk, differentiated by autograd."""
    n = image.shape[0]
    total = 0.0
    for r0 in range(0, n, CHUNK_ROWS):
        logits = logit_scale * image[r0:r0 + CHUNK_ROWS] @ text.T + logit_bias
        labels = -torch.ones_like(logits)
        labels.diagonal(offset=r0).fill_(1.0)
        total = total - F.logsigmoid(labels * logits).sum()
    return total / n


def loss_function(impl):
    """fn(image, text, logit_scale, logit_bias) -> scalar loss for an implementation name."""
    if impl == "materialised":
        return materialised_siglip
    if impl == "chunked autograd":
        return chunked_autograd_siglip
    backend = impl[len("fastcontrast["):-1]
    return lambda *args: siglip_loss(*args, backend=backend)


def make_inputs(n, d, dtype=torch.float32, device="cpu", seed=0):
    """[image, text, logit_scale, logit_bias], all leaves that require grad."""
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=gen), dim=1)
    text = F.normalize(image + F.normalize(torch.randn(n, d, generator=gen), dim=1), dim=1)
    features = [t.to(device=device, dtype=dtype).requires_grad_() for t in (image, text)]
    params = [torch.tensor(v, device=device, requires_grad=True) for v in (SCALE, BIAS)]
    return features + params


def forward_backward(fn, inputs):
    """One forward+backward; returns the loss as a float."""
    loss = fn(*inputs)
    torch.autograd.grad(loss, inputs)
    return float(loss.detach())


def make_step(impl, n, d, seed=0):
    """A zero-argument forward+backward of ``impl`` on fresh inputs (for the memory probe, which
    pickles this function by name and calls it in a fresh process)."""
    fn, inputs = loss_function(impl), make_inputs(n, d, seed=seed)
    return lambda: forward_backward(fn, inputs)


def siglip_flop(n, d):
    """The essential work of forward+backward: 3 products of the N x N x D shape (logits,
    d image, d text), 2 FLOP per multiply-add."""
    return 6 * n * n * d
