"""``fastcontrast.compat.patch("open_clip")`` on a training script written against OpenCLIP.

The script is a minimal equivalent of OpenCLIP's ``open_clip_train.train.train_one_epoch``
(accum_freq=1, fp32, no grad clipping), not that function itself: ``open_clip_train.train``
imports ``CLIP`` / ``get_input_dtype`` from the ``open_clip`` package, whose ``__init__`` loads
the model zoo and torchvision, which cannot be imported beside this torch build (only the loss
module is loaded, with the benchmark's import shims). It keeps what matters to the loss: the
loss class is looked up in ``open_clip.loss`` when the run starts and built as OpenCLIP's
``create_loss`` builds it, the model returns OpenCLIP's output dict (normalised features,
``logit_scale.exp()``, ``logit_bias`` for SigLIP; shape () or, with ``nonscalar_logit_scale``,
(1,)), the loss is called as ``loss(**model_out, output_dict=True)`` and summed, AdamW steps,
and the logit scale is clamped to ln(100) after each step.

Run once on OpenCLIP's classes and once patched, the loss trajectories agree within float32
rounding; after ``unpatch`` OpenCLIP's classes are back.
"""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcontrast.compat as fcc
from fastcontrast.compat import open_clip as compat
from tests._helpers import assert_close
from tests.compat.test_open_clip_compat import peer  # noqa: F401 - the fixture

STEPS = 5
BATCH, IMAGE_DIM, TEXT_DIM, EMBED_DIM = 16, 12, 10, 8


@pytest.fixture(scope="module")
def open_clip_loss(peer):
    yield peer
    fcc.unpatch("open_clip")  # whatever a failed test left behind


class TinyClip(nn.Module):
    """Linear image and text towers and OpenCLIP's learnable logit scale (stored as its log,
    init ln(1/0.07); SigLIP: ln(10) and a bias of -10)."""

    def __init__(self, siglip, nonscalar_logit_scale):
        super().__init__()
        self.visual = nn.Linear(IMAGE_DIM, EMBED_DIM)
        self.text = nn.Linear(TEXT_DIM, EMBED_DIM)
        shape = [1] if nonscalar_logit_scale else []
        init_scale = math.log(10) if siglip else math.log(1 / 0.07)
        self.logit_scale = nn.Parameter(torch.ones(shape) * init_scale)
        self.logit_bias = nn.Parameter(torch.ones(shape) * -10.0) if siglip else None

    def forward(self, images, texts):
        out = {"image_features": F.normalize(self.visual(images), dim=-1),
               "text_features": F.normalize(self.text(texts), dim=-1),
               "logit_scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out


def train(siglip=False, nonscalar_logit_scale=False):
    """The training script: (the loss class it used, the total loss of each step)."""
    loss_module = importlib.import_module("open_clip.loss")  # looked up at run time
    if siglip:
        loss = loss_module.SigLipLoss(rank=0, world_size=1, dist_impl=None)
    else:
        loss = loss_module.ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True,
                                    rank=0, world_size=1, use_horovod=False)
    torch.manual_seed(0)
    model = TinyClip(siglip, nonscalar_logit_scale)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    data = torch.Generator().manual_seed(1)
    trajectory = []
    for _ in range(STEPS):
        images = torch.randn(BATCH, IMAGE_DIM, generator=data)
        texts = images[:, :TEXT_DIM] + 0.5 * torch.randn(BATCH, TEXT_DIM, generator=data)
        optimizer.zero_grad()
        losses = loss(**model(images, texts), output_dict=True)
        total_loss = sum(losses.values())
        total_loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        trajectory.append(total_loss.detach())
    return type(loss), torch.stack(trajectory)


@pytest.mark.parametrize("siglip", [False, True], ids=["ClipLoss", "SigLipLoss"])
@pytest.mark.parametrize("nonscalar", [False, True], ids=["scale ()", "scale (1,)"])
def test_patched_script_follows_the_same_trajectory(open_clip_loss, siglip, nonscalar):
    name = "SigLipLoss" if siglip else "ClipLoss"
    original = getattr(open_clip_loss, name)
    used, expected = train(siglip, nonscalar)
    assert used is original
    fcc.patch("open_clip")
    try:
        assert getattr(open_clip_loss, name) is getattr(compat, name)
        used, trajectory = train(siglip, nonscalar)
        assert used is getattr(compat, name)
    finally:
        fcc.unpatch("open_clip")
    assert getattr(open_clip_loss, name) is original
    assert open_clip_loss.CoCaLoss is not compat.CoCaLoss
    assert not torch.equal(expected[0], expected[-1])  # the script trains
    assert_close(trajectory, expected, torch.float32, f"{name} trajectory", max_logit=100.0)
