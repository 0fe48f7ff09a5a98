"""fastcontrast.compat.open_clip.DistillClipLoss with world_size = 2: two gloo processes (one
spawn for the module, as test_open_clip_distributed.py) run OpenCLIP's own DistillClipLoss and
the drop-in on the same shards, float64, gather_with_grad=True. Per rank, both terms' values
and the feature gradients of their sum equal the peer's (local_loss True and False);
logit_scale's gradient too with local_loss=False, its mean over the ranks with local_loss=True
(the ranks split it differently, as ClipLoss's)."""
import pytest
import torch
import torch.nn.functional as F

from tests._helpers import assert_close

WORLD, N_LOCAL, DIM, TEACHER_DIM = 2, 5, 3, 4
TOL = {torch.float64: (1e-12, 1e-12)}


def _run(loss, rank):
    """((contrastive, distill), [grad image, grad text, grad logit_scale] of their sum)."""
    gen = torch.Generator().manual_seed(31)
    noise = torch.randn(4, WORLD * N_LOCAL, TEACHER_DIM, generator=gen, dtype=torch.float64)
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    image, text = (F.normalize(noise[i, rows, :DIM], dim=-1).requires_grad_() for i in (0, 1))
    dist_image, dist_text = (F.normalize(noise[i, rows], dim=-1) for i in (2, 3))
    scale = torch.tensor(30.0, dtype=torch.float64, requires_grad=True)
    terms = loss(image, text, scale, dist_image, dist_text, torch.tensor(50.0,
                                                                         dtype=torch.float64))
    grads = torch.autograd.grad(terms[0] + terms[1], [image, text, scale])
    return [t.detach() for t in terms], grads


def _worker(rank, world_size):
    from fastcontrast.compat import open_clip as compat
    from tests.compat.test_open_clip_compat import load_open_clip_loss

    peer, reason = load_open_clip_loss()
    out = {"skip": reason}
    for local in (True, False):
        options = dict(local_loss=local, gather_with_grad=True, rank=rank, world_size=world_size)
        out[("ours", local)] = _run(compat.DistillClipLoss(**options), rank)
        if peer is not None:
            out[("peer", local)] = _run(peer.DistillClipLoss(**options), rank)
    return out


@pytest.fixture(scope="module")
def with_peer():
    """Every rank's outputs, one spawn for the module (skipped without OpenCLIP)."""
    from fastcontrast.methods.launch import spawn

    ranks = spawn(_worker, WORLD, timeout=240, collective_timeout_s=30, threads=1)
    if ranks[0]["skip"] is not None:
        pytest.skip(ranks[0]["skip"])
    return ranks


@pytest.mark.parametrize("local", [True, False])
def test_matches_the_peer_on_every_rank(with_peer, local):
    for rank, out in enumerate(with_peer):
        (terms, grads), (ref, ref_grads) = out[("ours", local)], out[("peer", local)]
        for what, got, want in zip(("contrastive", "distill"), terms, ref):
            assert_close(got, want, torch.float64, f"rank {rank} {what}", tolerances=TOL)
        for i in (0, 1) if local else (0, 1, 2):
            assert_close(grads[i], ref_grads[i], torch.float64, f"rank {rank} grad {i}",
                         tolerances=TOL)
    ours, theirs = (torch.stack([out[(who, local)][1][2] for out in with_peer]).mean()
                    for who in ("ours", "peer"))
    assert_close(ours, theirs, torch.float64, "mean logit_scale grad", tolerances=TOL)
