"""fastcontrast.gradcache: a chunked GradCache step gives the gradients of the full-batch step.

The plain step it is compared with forwards the same chunks with a graph (so dropout draws the
same masks from the same generator), concatenates the embeddings and back-propagates the loss
once: the textbook full-batch step. All in float64; the DDP case (W = 2 gloo processes) runs in
the shared spawn of ``_train_workers.world2_results``."""
import pytest
import torch
from torch import nn

import fastcontrast as fc
from fastcontrast.gradcache import gradcache_step, split_chunks

from ._train_workers import TinyTower, world2_results


def _grads(module):
    return [p.grad.clone() for p in module.parameters()]


def _plain_step(encoders, inputs, loss_fn, chunk_size):
    """Full-batch step with the graph of every chunk kept (the memory GradCache saves)."""
    embeddings = []
    for encoder, x in zip(encoders, inputs):
        embeddings.append(torch.cat([encoder(part) for part in split_chunks(x, chunk_size)]))
    loss = loss_fn(*embeddings)
    loss.backward()
    return loss.detach()


def _close(a, b, tol=1e-10):
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=tol, rtol=0), (x - y).abs().max()


@pytest.mark.parametrize("chunk_size", [5, 16, 64])
def test_two_encoders_clip_style(chunk_size):
    torch.manual_seed(0)
    image, text = TinyTower(12, 8, dropout=0.2).double(), TinyTower(10, 8, dropout=0.3).double()
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    x, t = torch.randn(37, 12, dtype=torch.float64), torch.randn(37, 10, dtype=torch.float64)

    def loss_fn(a, b):
        return fc.clip_loss(a, b, scale, backend="reference")

    torch.manual_seed(1)
    plain = _plain_step((image, text), (x, t), loss_fn, chunk_size)
    expected = _grads(image) + _grads(text) + [scale.grad.clone()]
    rng_after_plain = torch.get_rng_state()
    for p in list(image.parameters()) + list(text.parameters()) + [scale]:
        p.grad = None
    torch.manual_seed(1)
    loss = gradcache_step((image, text), (x, t), loss_fn, chunk_size=chunk_size)
    assert not loss.requires_grad
    assert abs(float(loss) - float(plain)) < 1e-12
    _close(_grads(image) + _grads(text) + [scale.grad], expected)
    assert torch.equal(torch.get_rng_state(), rng_after_plain)  # the generator moved alike


def test_one_encoder_two_views_simclr_style():
    torch.manual_seed(0)
    model = TinyTower(9, 6, dropout=0.25).double()
    a, b = torch.randn(20, 9, dtype=torch.float64), torch.randn(20, 9, dtype=torch.float64)

    def loss_fn(z1, z2):
        return fc.nt_xent(z1, z2, temperature=0.3, backend="reference")

    torch.manual_seed(2)
    plain = _plain_step((model, model), (a, b), loss_fn, 7)
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    loss = gradcache_step((model, model), (a, b), loss_fn, chunk_size=7)
    assert abs(float(loss) - float(plain)) < 1e-12
    _close(_grads(model), expected)


def test_without_dropout_matches_one_unchunked_forward():
    torch.manual_seed(0)
    model = TinyTower(9, 6, dropout=0.0).double()
    a, b = torch.randn(33, 9, dtype=torch.float64), torch.randn(33, 9, dtype=torch.float64)

    def loss_fn(z1, z2):
        return fc.info_nce(z1, z2, temperature=0.2, symmetric=True, backend="reference")

    loss_fn(model(a), model(b)).backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    gradcache_step((model, model), (a, b), loss_fn, chunk_size=4)
    _close(_grads(model), expected)


def test_rng_replay_is_what_makes_dropout_exact():
    torch.manual_seed(0)
    model = TinyTower(9, 6, dropout=0.5).double()
    a, b = torch.randn(16, 9, dtype=torch.float64), torch.randn(16, 9, dtype=torch.float64)

    def loss_fn(z1, z2):
        return fc.nt_xent(z1, z2, backend="reference")

    torch.manual_seed(3)
    _plain_step((model, model), (a, b), loss_fn, 4)
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    gradcache_step((model, model), (a, b), loss_fn, chunk_size=4, replay_rng=False)
    assert max((x - y).abs().max() for x, y in zip(_grads(model), expected)) > 1e-3


def test_structured_inputs_and_validation():
    class DictTower(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4).double(), nn.Linear(2, 4).double()

        def forward(self, batch):
            return self.a(batch["x"]) + self.b(batch["y"])

    torch.manual_seed(0)
    tower = DictTower()
    inputs = {"x": torch.randn(11, 3, dtype=torch.float64),
              "y": torch.randn(11, 2, dtype=torch.float64)}
    keys = torch.randn(11, 4, dtype=torch.float64)

    def loss_fn(z):
        return fc.info_nce(z, keys, backend="reference")

    loss_fn(tower(inputs)).backward()
    expected = _grads(tower)
    tower.zero_grad(set_to_none=True)
    gradcache_step(tower, inputs, loss_fn, chunk_size=3)
    _close(_grads(tower), expected)
    with pytest.raises(ValueError, match="chunk_size"):
        gradcache_step(tower, inputs, loss_fn, chunk_size=0)
    with pytest.raises(ValueError, match="one input per encoder"):
        gradcache_step((tower, tower), (inputs,), loss_fn, chunk_size=3)
    with pytest.raises(ValueError, match="scalar"):
        gradcache_step(tower, inputs, lambda z: z.sum(1), chunk_size=3)


def test_ddp_world2_equals_single_process_full_batch():
    """W = 2 gloo ranks, each half of the batch, DDP-wrapped towers (one all-reduce per step:
    no_sync on all chunks but the last), the loss over the gathered embeddings; the summed
    gradients equal the single-process full-batch step's, and the loss value too."""
    results = world2_results()
    torch.manual_seed(0)
    reference = results["gradcache_reference"]
    for rank in (0, 1):
        cases = {"fallback": results["ranks"][rank]["gradcache"],
                 **results["ranks"][rank]["gradcache_modes"]}  # + gather, ring when available
        for mode, got in cases.items():
            assert abs(got["loss"] - reference["loss"]) < 1e-12, mode
            _close(got["grads"], reference["grads"])
            assert got["allreduce_calls"] == got["expected_allreduce_calls"], mode
