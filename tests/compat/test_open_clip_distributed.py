"""fastcontrast.compat.open_clip with world_size = 2: two gloo processes on 127.0.0.1 (one spawn
for the whole module; every collective times out after 30 s, the spawn is killed after 240 s)
run OpenCLIP's own ClipLoss / SigLipLoss and the drop-ins on the same shards, float64.

Asserted against the peer in the same processes, per rank (values and gradients to 1e-12):
    SigLipLoss, every dist_impl             equal to the peer's
    ClipLoss gather_with_grad=True          equal to the peer's (local_loss True and False),
                                            except with local_loss=True logit_scale's gradient:
                                            split differently over the ranks, same mean
    ClipLoss gather_with_grad=False         values and logit_scale gradients as with
                                            gather_with_grad=True; feature gradients those of
                                            gather_with_grad=True (OpenCLIP issue #616: the
                                            peer's local_loss=False gradients are 1 / W of them)
and against one process on the whole batch: the mean over the ranks of the values, W x the
whole-batch gradient of each rank's shard."""
import functools

import pytest
import torch
import torch.nn.functional as F

from tests._helpers import assert_close

WORLD = 2
N_LOCAL, DIM = 5, 3
TOL = {torch.float64: (1e-12, 1e-12)}
CLIP_OPTIONS = [(local, gather) for local in (True, False) for gather in (True, False)]
SIGLIP_IMPLS = ("bidir", "shift", "reduce", "gather")
UNEVEN = (3, 7)  # rows per rank, WORLD * N_LOCAL in all


def _rows(sizes, rank):
    return slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))


def _batch():
    """The whole batch (image, text), the same in every process."""
    gen = torch.Generator().manual_seed(22)
    noise = torch.randn(2, WORLD * N_LOCAL, DIM, generator=gen, dtype=torch.float64)
    image = F.normalize(noise[0], dim=-1)
    text = F.normalize(image + 0.8 * noise[1], dim=-1)
    return image, text


def _run(loss, rows, scale_value, bias_value):
    """(value, [grad image, grad text, grad logit_scale, grad logit_bias]) on ``rows``."""
    image, text = (t[rows].clone().requires_grad_() for t in _batch())
    scale = torch.tensor(scale_value, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(bias_value, dtype=torch.float64, requires_grad=True)
    value = loss(image, text, scale, bias)
    grads = torch.autograd.grad(value, [image, text, scale, bias], allow_unused=True)
    return value.detach(), [torch.zeros(()) if g is None else g for g in grads]


def _worker(rank, world_size):
    from fastcontrast.compat import open_clip as compat
    from tests.compat.test_open_clip_compat import load_open_clip_loss

    peer, reason = load_open_clip_loss()
    rows = _rows((N_LOCAL,) * world_size, rank)
    out = {"skip": reason}
    for local, gather in CLIP_OPTIONS:
        options = dict(local_loss=local, gather_with_grad=gather, rank=rank, world_size=world_size)
        out[("clip", local, gather)] = _run(compat.ClipLoss(**options), rows, 30.0, -2.0)
        if peer is not None:
            out[("peer clip", local, gather)] = _run(peer.ClipLoss(**options), rows, 30.0, -2.0)
    for impl in SIGLIP_IMPLS:
        options = dict(rank=rank, world_size=world_size, dist_impl=impl)
        out[("siglip", impl)] = _run(compat.SigLipLoss(**options), rows, 10.0, -3.0)
        if peer is not None:
            out[("peer siglip", impl)] = _run(peer.SigLipLoss(**options), rows, 10.0, -3.0)
    uneven = _rows(UNEVEN, rank)
    out[("uneven clip", False, True)] = _run(
        compat.ClipLoss(rank=rank, world_size=world_size), uneven, 30.0, -2.0)
    out[("uneven siglip", "bidir")] = _run(
        compat.SigLipLoss(rank=rank, world_size=world_size), uneven, 10.0, -3.0)
    for wrong in (dict(rank=1 - rank, world_size=2), dict(rank=0, world_size=3)):
        try:
            compat.ClipLoss(**wrong)(*_batch(), 10.0)
            out[("wrong", wrong["world_size"])] = "no error"
        except ValueError as error:
            out[("wrong", wrong["world_size"])] = str(error)
    return out


@functools.lru_cache(maxsize=1)
def _ranks():
    from fastcontrast.methods.launch import spawn

    return spawn(_worker, WORLD, timeout=240, collective_timeout_s=30, threads=1)


@pytest.fixture(scope="module")
def ranks():
    return _ranks()


@pytest.fixture(scope="module")
def with_peer(ranks):
    if ranks[0]["skip"] is not None:
        pytest.skip(ranks[0]["skip"])
    return ranks


def _same(ours, theirs, what, only=None):
    (value, grads), (ref, ref_grads) = ours, theirs
    assert_close(value, ref, torch.float64, f"{what} value", tolerances=TOL)
    for i in (range(4) if only is None else only):
        assert_close(grads[i], ref_grads[i], torch.float64, f"{what} grad {i}", tolerances=TOL)


@pytest.mark.parametrize("impl", SIGLIP_IMPLS)
def test_siglip_matches_the_peer_on_every_rank(with_peer, impl):
    for rank, out in enumerate(with_peer):
        _same(out[("siglip", impl)], out[("peer siglip", impl)], f"rank {rank} {impl}")


def _mean_scale_grad(ranks, key):
    return torch.stack([out[key][1][2] for out in ranks]).mean()


@pytest.mark.parametrize("local", [True, False])
def test_clip_with_gather_with_grad_matches_the_peer(with_peer, local):
    """local_loss=True: the ranks split logit_scale's gradient differently (the text -> image
    terms are computed where the image tiles are); its mean over the ranks, what DDP applies,
    is the peer's."""
    ours_key, peer_key = ("clip", local, True), ("peer clip", local, True)
    for rank, out in enumerate(with_peer):
        _same(out[ours_key], out[peer_key], f"rank {rank}", only=(0, 1, 3) if local else None)
    assert_close(_mean_scale_grad(with_peer, ours_key), _mean_scale_grad(with_peer, peer_key),
                 torch.float64, "mean logit_scale grad", tolerances=TOL)


@pytest.mark.parametrize("local", [True, False])
def test_clip_without_gather_with_grad_keeps_the_full_gradient(with_peer, local):
    for rank, out in enumerate(with_peer):
        ours, theirs = out[("clip", local, False)], out[("peer clip", local, False)]
        _same(ours, theirs, f"rank {rank} value", only=(3,) if local else (2, 3))
        _same(ours, out[("clip", local, True)], f"rank {rank} as gather_with_grad=True")
        if not local:  # OpenCLIP #616: one copy of the loss's gradient, 1 / W of ours
            for i in (0, 1):
                assert_close(theirs[1][i] * WORLD, ours[1][i], torch.float64, "W x peer",
                             tolerances=TOL)


def _whole_batch(loss_fn, scale, bias):
    image, text = (t.clone().requires_grad_() for t in _batch())
    value = loss_fn(image, text, scale, bias)
    return value.detach(), torch.autograd.grad(value, [image, text])


@pytest.mark.parametrize("kind", ["clip local", "clip global", "siglip", "uneven clip global",
                                  "uneven siglip"])
def test_against_one_process_on_the_whole_batch(ranks, kind):
    """Uneven batches (which OpenCLIP's gathers cannot run) follow the same convention."""
    from fastcontrast.compat import open_clip as compat

    sizes = UNEVEN if kind.startswith("uneven") else (N_LOCAL,) * WORLD
    key = {"clip local": ("clip", True, True), "clip global": ("clip", False, True),
           "siglip": ("siglip", "bidir"), "uneven clip global": ("uneven clip", False, True),
           "uneven siglip": ("uneven siglip", "bidir")}[kind]
    if kind.endswith("siglip"):
        whole = _whole_batch(compat.SigLipLoss(), 10.0, -3.0)
    else:
        whole = _whole_batch(compat.ClipLoss(), 30.0, -2.0)
    values = torch.stack([out[key][0] for out in ranks])
    if kind.endswith("clip global"):  # every rank returns the whole batch's loss
        assert_close(values, whole[0].expand(WORLD), torch.float64, "values", tolerances=TOL)
    assert_close(values.mean(), whole[0], torch.float64, "mean of the values", tolerances=TOL)
    for rank, out in enumerate(ranks):
        for i in (0, 1):
            assert_close(out[key][1][i], WORLD * whole[1][i][_rows(sizes, rank)], torch.float64,
                         f"rank {rank} grad {i}", tolerances=TOL)


def test_rank_and_world_size_must_be_the_process_groups(ranks):
    for rank, out in enumerate(ranks):
        assert f"(rank, world_size) = ({rank}, 2), got ({1 - rank}, 2)" in out[("wrong", 2)]
        assert f"(rank, world_size) = ({rank}, 2), got (0, 3)" in out[("wrong", 3)]
