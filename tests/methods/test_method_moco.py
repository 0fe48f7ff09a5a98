"""MoCo (fastcontrast.methods.moco): the loss against the reference backend and a float64
InfoNCE written out, shuffle-BN (emulated and across two gloo ranks), momentum update and
queue, views, bad input (training runs, determinism and the same-curve check:
tests/methods/test_methods_trainer.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastcontrast.methods import moco
from fastcontrast.methods.data import ClutteredDigits

TINY = {"width": 4, "feature_dim": 16, "projection_dim": 8, "queue_size": 40}


@pytest.fixture(scope="module")
def digits():
    return ClutteredDigits("train")


def _batch(method, dataset, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return method.views(dataset, torch.randperm(len(dataset), generator=g)[:n], g)


def _pair(**overrides):
    a = moco.build(**{**TINY, **overrides})
    b = moco.build(backend="reference", **{**TINY, **overrides})
    b.load_state_dict(a.state_dict())
    return a, b


def _step(method, batch):
    out = method.loss(batch)
    out["loss"].backward()
    method.after_step()
    return out


@pytest.mark.parametrize("version", [1, 2])
def test_loss_and_grads_match_reference_backend_over_steps(digits, version):
    """Three steps (the queue then holds keys of the same images, which are excluded)."""
    fused, ref = _pair(version=version)
    for step in range(3):
        batch = _batch(fused, digits, 13, seed=step % 2)
        out_f, out_r = _step(fused, batch), _step(ref, batch)
        torch.testing.assert_close(out_f["loss"], out_r["loss"], rtol=1e-5, atol=1e-5)
        scale = max(float(q.grad.abs().max()) for q in ref.parameters() if q.grad is not None)
        for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
            if q.grad is None:
                assert p.grad is None, name
                continue
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
        fused.zero_grad()
        ref.zero_grad()
    torch.testing.assert_close(fused.queue.negatives(), ref.queue.negatives())


def test_loss_equals_infonce_written_out_in_float64(digits):
    """bn_splits=1 (BatchNorm over the whole batch does not depend on the shuffle): the loss is
    cross-entropy over [q.k+, q.u_j] / tau with queue entries of the same image left out."""
    method = moco.build(bn_splits=1, **TINY).double()
    tau = moco.DEFAULTS["temperature"]
    for step in range(2):  # the second step sees the first step's keys in the queue
        batch = _batch(method, digits, 11, seed=0)
        batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
        out = method.loss(batch)
        q = F.normalize(method.head_q(method.encoder_q(batch["query"])), dim=1)
        with torch.no_grad():
            k = F.normalize(method.head_k(method.encoder_k(batch["key"])), dim=1)
        u = F.normalize(method.queue.negatives(), dim=1)
        same = batch["index"][:, None] == method.queue.stored_indices()[None, :]
        negatives = (q @ u.T / tau).masked_fill(same, -math.inf)
        logits = torch.cat([(q * k).sum(1, keepdim=True) / tau, negatives], 1)
        expected = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.int64))
        torch.testing.assert_close(out["loss"], expected, rtol=1e-10, atol=1e-10)
        assert (step == 0) == (not same.any())
        out["loss"].backward()
        method.after_step()


def test_shuffle_bn_unshuffles_and_separates_statistics(digits):
    method = moco.build(bn_splits=4, **TINY)
    x = _batch(method, digits, 16)["key"]
    identity, perm = torch.arange(16), torch.randperm(16)
    # eval mode (running statistics): the keys cannot depend on the shuffle
    method.eval()
    with torch.no_grad():
        plain = method.head_k(method.encoder_k(x))
    torch.testing.assert_close(method._keys(x, perm), plain)
    # train mode: each sub-batch has its own statistics, so the shuffle changes the keys,
    # and each key equals the encoding of its shuffled sub-batch
    method.train()
    a, b = method._keys(x, identity), method._keys(x, perm)
    assert not torch.allclose(a, b, atol=1e-4)
    first = perm[:4]  # the first emulated device gets samples perm[0..3]
    with torch.no_grad():
        expected = method.head_k(method.encoder_k(x[first]))
    torch.testing.assert_close(b[first], expected)


def test_after_step_updates_key_encoder_and_queue(digits):
    m = 0.9
    method = moco.build(momentum=m, **TINY)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    batch = _batch(method, digits, 12)
    out = method.loss(batch)
    out["loss"].backward()
    opt.step()
    before = [p.clone() for p in method.encoder_k.parameters()]
    pointer = int(method.queue.pointer)
    method.after_step()
    for old, new, online in zip(before, method.encoder_k.parameters(),
                                method.encoder_q.parameters()):
        torch.testing.assert_close(new, m * old + (1 - m) * online)
    assert int(method.queue.pointer) == (pointer + 12) % TINY["queue_size"]
    newest = method.queue.stored_indices(oldest_first=True)[-12:]
    assert torch.equal(newest, batch["index"])
    keys = method.queue.negatives(oldest_first=True)[-12:]
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(12))
    assert not any(p.requires_grad for p in method.encoder_k.parameters())


def test_views_shapes_and_features(digits):
    method = moco.build(**TINY)
    batch = _batch(method, digits, 6)
    assert batch["query"].shape == batch["key"].shape == (6, 1, 24, 24)
    assert batch["index"].dtype == torch.int64 and batch["shuffle"].shape == (6,)
    assert torch.equal(batch["shuffle"].sort().values, torch.arange(6))
    assert method.features(batch["query"]).shape == (6, TINY["feature_dim"])
    out = method.loss(batch)
    assert out["mi_bound"] == pytest.approx(math.log(TINY["queue_size"] + 1)
                                            - float(out["loss"].detach()), abs=1e-6)
    assert 0 <= float(out["accuracy"]) <= 1


def test_blur_keeps_unblurred_images_and_mass():
    images = torch.rand(8, 1, 12, 12)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(moco.gaussian_blur(images, 0.0, g), images)
    blurred = moco.gaussian_blur(images, 1.0, g)
    assert not torch.allclose(blurred, images)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # away from zero padding
    assert blurred.shape == images.shape and blurred[inner].mean() > 0


def test_bad_input(digits):
    method = moco.build(**TINY)
    batch = _batch(method, digits, 4)
    with pytest.raises(ValueError, match="missing"):
        method.loss({"query": batch["query"]})
    with pytest.raises(ValueError, match="key"):
        method.loss({**batch, "key": batch["key"][:3]})
    with pytest.raises(ValueError, match="index"):
        method.loss({**batch, "index": batch["index"].float()})
    with pytest.raises(ValueError, match="shuffle"):
        method.loss({**batch, "shuffle": torch.zeros(4, dtype=torch.int64)})
    with pytest.raises(ValueError, match="unknown MoCo settings"):
        moco.build(queue=10)
    with pytest.raises(ValueError, match="version"):
        moco.build(version=3)
    with pytest.raises(ValueError, match="momentum"):
        moco.build(momentum=1.5)
    with pytest.raises(ValueError, match="bn_splits"):
        moco.build(bn_splits=0)
    with pytest.raises(ValueError, match="at least 2"):
        method.loss({k: v[:1] for k, v in batch.items()})


def _distributed_worker(rank, world, port, result_queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)  # the same initial weights on every rank
        method = moco.build(**TINY)
        g = torch.Generator().manual_seed(rank)
        x = torch.rand(6, 1, 24, 24, generator=g)
        # eval mode: BatchNorm uses running statistics, so the gathered, shuffled, encoded,
        # gathered and unshuffled keys must be exactly this rank's own keys
        method.eval()
        with torch.no_grad():
            expected = method.head_k(method.encoder_k(x))
        same = torch.allclose(method._keys(x, torch.arange(6)), expected, atol=1e-6)
        method.train()
        batch = {"query": x, "key": x.flip(3), "index": torch.arange(6) + 6 * rank,
                 "shuffle": torch.arange(6)}
        out = method.loss(batch)
        out["loss"].backward()
        method.after_step()
        indices = method.queue.stored_indices(oldest_first=True)[-12:].tolist()
        result_queue.put((rank, same, bool(torch.isfinite(out["loss"])), indices))
    finally:
        dist.destroy_process_group()


def test_shuffle_bn_across_two_gloo_ranks():
    """Real shuffle-BN with torch.distributed: keys come back to their own rank and sample,
    and both ranks enqueue the keys of the whole global batch."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    result_queue = ctx.Queue()
    procs = [ctx.Process(target=_distributed_worker, args=(r, 2, port, result_queue))
             for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(result_queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, same, finite, indices in results:
        assert same, f"rank {rank}: keys not returned to their own samples"
        assert finite
        assert indices == list(range(12))
