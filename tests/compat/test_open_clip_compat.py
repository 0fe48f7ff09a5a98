"""fastcontrast.compat.open_clip against the installed open-clip-torch (its loss module, loaded
with the benchmark's import shims), one process: the peer's signatures, values and gradients on
the same inputs (float64 to 1e-12, float32 to 2e-5 plus the rounding of logits as large as the
scale, relative to the reference's scale) for every option the classes take, and the errors."""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from fastcontrast.cli.bench import benchmarks_package
from tests._helpers import assert_close

benchmarks_package()  # fastcontrast.benchmarks, installed or from the checkout
from fastcontrast.benchmarks import peers  # noqa: E402

from fastcontrast.compat import open_clip as compat  # noqa: E402

from ._parity import PARITY  # noqa: E402

CLASSES = ("ClipLoss", "SigLipLoss", "CoCaLoss")


def load_open_clip_loss():
    """open_clip.loss (the peer's module), or None with the reason."""
    cls, reason = peers.load_peer("open_clip ClipLoss")
    return (None, reason) if cls is None else (inspect.getmodule(cls), None)


@pytest.fixture(scope="module")
def peer():
    module, reason = load_open_clip_loss()
    if module is None:
        pytest.skip(reason)
    return module


def _parameters(fn):
    """(name, kind, default) of each parameter: the signature without annotations."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", CLASSES)
def test_signatures_are_the_peers(peer, name):
    ours, theirs = getattr(compat, name), getattr(peer, name)
    assert _parameters(ours.__init__) == _parameters(theirs.__init__)
    assert _parameters(ours.forward) == _parameters(theirs.forward)


def features(n, d, dtype):
    """Unit-norm features, as CLIP models return them; text close to its image."""
    image = F.normalize(torch.randn(n, d, dtype=dtype), dim=-1)
    text = F.normalize(image + 0.7 * torch.randn(n, d, dtype=dtype), dim=-1)
    return image.requires_grad_(), text.requires_grad_()


def _scalar(kind, value, dtype):
    if kind == "float":
        return value
    shape = () if kind == "0-dim" else (1,)
    return torch.full(shape, value, dtype=dtype, requires_grad=True)


def run(loss_module, inputs, output_dict=False, **kwargs):
    """(loss, gradients of every tensor input that requires grad)."""
    out = loss_module(*inputs, output_dict=output_dict, **kwargs)
    loss = out["contrastive_loss"] if output_dict else out
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return loss, torch.autograd.grad(loss, leaves)


def assert_parity(ours, theirs, dtype, what, max_logit=0.0):
    (loss, grads), (ref, ref_grads) = ours, theirs
    assert loss.shape == ref.shape and loss.dtype == ref.dtype, what
    assert_close(loss, ref, dtype, f"{what} loss", tolerances=PARITY, max_logit=max_logit)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.shape == r.shape, f"{what} grad {i}: {g.shape} != {r.shape}"
        assert_close(g, r, dtype, f"{what} grad {i}", tolerances=PARITY, max_logit=max_logit)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,d", [(1, 3), (257, 3), (9, 16)])
@pytest.mark.parametrize("scale_kind", ["float", "0-dim", "(1,)"])
def test_clip_loss_matches(peer, dtype, n, d, scale_kind):
    image, text = features(n, d, dtype)
    scale = _scalar(scale_kind, 100.0, dtype)
    for bias in (None, _scalar(scale_kind, -4.0, dtype)):
        inputs = (image, text, scale) if bias is None else (image, text, scale, bias)
        for options in (dict(), dict(local_loss=True, gather_with_grad=True, cache_labels=True)):
            for output_dict in (False, True):
                ours = run(compat.ClipLoss(**options), inputs, output_dict)
                theirs = run(peer.ClipLoss(**options), inputs, output_dict)
                assert_parity(ours, theirs, dtype, f"ClipLoss {options} bias={bias}",
                              max_logit=100.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,d", [(1, 3), (257, 3), (9, 16)])
@pytest.mark.parametrize("scale_kind", ["float", "0-dim", "(1,)"])
def test_siglip_loss_matches(peer, dtype, n, d, scale_kind):
    image, text = features(n, d, dtype)
    scale = _scalar(scale_kind, 10.0, dtype)
    for bias in (None, -10.0, _scalar(scale_kind, -10.0, dtype)):
        for options in (dict(), dict(cache_labels=True, dist_impl="gather")):
            for output_dict in (False, True):
                inputs = (image, text, scale, bias)
                ours = run(compat.SigLipLoss(**options), inputs, output_dict)
                theirs = run(peer.SigLipLoss(**options), inputs, output_dict)
                assert_parity(ours, theirs, dtype, f"SigLipLoss {options} bias={bias}",
                              max_logit=20.0)


@pytest.mark.parametrize("clip_weight", [1.0, 0.0])
def test_coca_loss_matches(peer, clip_weight):
    b, length, vocab, pad = 5, 7, 11, 0
    image, text = features(b, 8, torch.float64)
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64).exp().detach().requires_grad_()
    logits = torch.randn(b, length, vocab, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(1, vocab, (b, length))
    labels[:, -2:] = pad  # padded tail, left out of the caption loss
    inputs = (image, text, logits, labels, scale)
    for output_dict in (False, True):
        outputs = []
        for cls in (compat.CoCaLoss, peer.CoCaLoss):
            out = cls(caption_loss_weight=2.0, clip_loss_weight=clip_weight, pad_id=pad)(
                *inputs, output_dict=output_dict)
            terms = list(out.values()) if output_dict else list(out)
            leaves = [image, text, logits, scale]
            total = sum(t for t in terms if t.is_floating_point())
            outputs.append((terms, torch.autograd.grad(total, leaves, allow_unused=True)))
        (ours, ours_grads), (theirs, theirs_grads) = outputs
        for o, t in zip(ours, theirs):
            assert o.dtype == t.dtype and o.shape == t.shape
            assert_close(o, t, torch.float64, "CoCaLoss term", tolerances=PARITY)
        for o, t in zip(ours_grads, theirs_grads):
            assert (o is None) == (t is None)
            if o is not None:
                assert_close(o, t, torch.float64, "CoCaLoss grad", tolerances=PARITY)


def test_cached_labels_follow_the_batch_size(peer):
    """One object called on changing batch sizes with cache_labels=True (the peer caches its
    label tensor per size; there is nothing to cache here)."""
    ours, theirs = compat.ClipLoss(cache_labels=True), peer.ClipLoss(cache_labels=True)
    for n in (5, 3, 5, 1):
        image, text = features(n, 4, torch.float64)
        assert_parity(run(ours, (image, text, 50.0)), run(theirs, (image, text, 50.0)),
                      torch.float64, f"ClipLoss cache_labels N={n}")


def test_logit_scale_of_shape_1_gets_its_gradient_in_its_shape():
    image, text = features(6, 4, torch.float64)
    for loss in (compat.ClipLoss(), compat.SigLipLoss()):
        scale = torch.full((1,), 20.0, dtype=torch.float64, requires_grad=True)
        bias = torch.full((1,), -2.0, dtype=torch.float64, requires_grad=True)
        out = loss(image, text, scale, bias)
        assert out.shape == ()
        out.backward()
        assert scale.grad.shape == (1,) and bias.grad.shape == (1,)


@pytest.mark.parametrize("build,error,words", [
    (lambda: compat.ClipLoss(use_horovod=True), NotImplementedError, "use_horovod=True"),
    (lambda: compat.CoCaLoss(1.0, 1.0, use_horovod=True), NotImplementedError, "use_horovod"),
    (lambda: compat.SigLipLoss(dist_impl="allgather"), ValueError,
     "dist_impl must be None or one of 'bidir', 'shift', 'reduce', 'gather', got 'allgather'"),
    (lambda: compat.ClipLoss(world_size=0), ValueError, "world_size must be >= 1, got 0"),
    (lambda: compat.ClipLoss(rank=2, world_size=2), ValueError,
     "rank must be in [0, world_size - 1] = [0, 1], got 2"),
    (lambda: compat.SigLipLoss(rank="0"), TypeError, "rank must be an int, got str"),
])
def test_bad_options_raise_naming_them(build, error, words):
    with pytest.raises(error) as raised:
        build()
    assert words in str(raised.value)


def test_world_size_without_a_process_group_is_refused():
    image, text = features(4, 3, torch.float64)
    for loss in (compat.ClipLoss(world_size=2), compat.SigLipLoss(rank=1, world_size=2)):
        with pytest.raises(RuntimeError, match=r"world_size=2\) needs an initialised"):
            loss(image, text, 10.0, -1.0)


@pytest.mark.parametrize("call,error,words", [
    (lambda i, t: compat.ClipLoss()(i, t, -1.0), ValueError,
     "logit_scale must be positive and finite, got -1.0"),
    (lambda i, t: compat.ClipLoss()(i, t, torch.ones(2)), ValueError,
     "logit_scale must be a float or a 0-dim tensor, got shape (2,)"),
    (lambda i, t: compat.SigLipLoss()(i, t, math.inf, 0.0), ValueError,
     "logit_scale must be finite, got inf"),
    (lambda i, t: compat.ClipLoss()(i, t[:3], 10.0), ValueError,
     "text must have the shape of image (4, 3)"),
    (lambda i, t: compat.SigLipLoss()(i, t.float(), 10.0, 0.0), TypeError,
     "text must have the dtype of image"),
])
def test_bad_inputs_raise_naming_the_argument(call, error, words):
    image, text = features(4, 3, torch.float64)
    with pytest.raises(error) as raised:
        call(image.detach(), text.detach())
    assert words in str(raised.value)
