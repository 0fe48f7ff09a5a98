"""fastcontrast.compat.open_clip.DistillClipLoss against the installed OpenCLIP's own
DistillClipLoss, one process: the signatures, both terms' values and the student's gradients
(features, logit_scale) of each term on the same inputs, to the PARITY tolerances, every
logit-scale kind, dict and tuple returns (world_size > 1: test_open_clip_distill_distributed.py)."""
import pytest
import torch
import torch.nn.functional as F

from fastcontrast.compat import open_clip as compat
from tests._helpers import assert_close
from tests.compat.test_open_clip_compat import (_parameters, _scalar, features,  # noqa: F401
                                                peer)

from ._parity import PARITY


def test_signature_is_the_peers(peer):
    assert _parameters(compat.DistillClipLoss.__init__) == _parameters(
        peer.DistillClipLoss.__init__)
    assert _parameters(compat.DistillClipLoss.forward) == _parameters(
        peer.DistillClipLoss.forward)


def _terms_and_grads(loss, inputs, output_dict, leaves):
    """([contrastive, distill], [grads of each term over ``leaves``])."""
    out = loss(*inputs, output_dict=output_dict)
    if output_dict:
        assert list(out) == ["contrastive_loss", "distill_loss"]
        out = tuple(out.values())
    assert isinstance(out, tuple) and len(out) == 2
    grads = [torch.autograd.grad(term, leaves, retain_graph=True) for term in out]
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,d,dt", [(1, 3, 3), (257, 3, 5), (9, 16, 8)])
@pytest.mark.parametrize("scale_kind", ["float", "0-dim", "(1,)"])
def test_distill_clip_loss_matches(peer, dtype, n, d, dt, scale_kind):
    image, text = features(n, d, dtype)
    dist_image = F.normalize(torch.randn(n, dt, dtype=dtype), dim=-1)
    dist_text = F.normalize(dist_image + 0.5 * torch.randn(n, dt, dtype=dtype), dim=-1)
    scale = _scalar(scale_kind, 50.0, dtype)
    dist_scale = _scalar(scale_kind, 100.0, dtype)
    if isinstance(dist_scale, torch.Tensor):
        dist_scale = dist_scale.detach()  # a frozen teacher
    inputs = (image, text, scale, dist_image, dist_text, dist_scale)
    leaves = [t for t in (image, text, scale) if isinstance(t, torch.Tensor)]
    for options in (dict(), dict(local_loss=True, gather_with_grad=True, cache_labels=True)):
        for output_dict in (False, True):
            ours, ours_grads = _terms_and_grads(compat.DistillClipLoss(**options), inputs,
                                                output_dict, leaves)
            theirs, theirs_grads = _terms_and_grads(peer.DistillClipLoss(**options), inputs,
                                                    output_dict, leaves)
            for i, what in enumerate(("contrastive", "distill")):
                o, t = ours[i], theirs[i]
                assert o.shape == t.shape and o.dtype == t.dtype, what
                assert_close(o, t, dtype, f"{what} {options}", tolerances=PARITY,
                             max_logit=100.0)
                for j, (g, r) in enumerate(zip(ours_grads[i], theirs_grads[i])):
                    assert g.shape == r.shape, f"{what} grad {j}: {g.shape} != {r.shape}"
                    assert_close(g, r, dtype, f"{what} grad {j} {options}", tolerances=PARITY,
                                 max_logit=100.0)


def test_the_teacher_gets_no_gradient():
    image, text = features(5, 4, torch.float64)
    dist_image, dist_text = features(5, 6, torch.float64)
    dist_scale = torch.tensor(30.0, dtype=torch.float64, requires_grad=True)
    out = compat.DistillClipLoss()(image, text, 20.0, dist_image, dist_text, dist_scale)
    sum(out).backward()
    assert image.grad is not None and text.grad is not None
    assert dist_image.grad is None and dist_text.grad is None and dist_scale.grad is None


def test_world_size_without_a_process_group_is_refused():
    image, text = features(4, 3, torch.float64)
    with pytest.raises(RuntimeError, match=r"world_size=2\) needs an initialised"):
        compat.DistillClipLoss(world_size=2)(image, text, 10.0, image.detach(), text.detach(),
                                             20.0)


def test_is_patched_in():
    assert compat.PATCH_TARGETS["open_clip.loss"]["DistillClipLoss"] is compat.DistillClipLoss
