"""Every method's training step (loss, backward, after_step) and its features create no tensor
on the default device: each tensor they make must follow its inputs' device.

A factory call without ``device=`` (torch.ones(b), torch.arange(n), torch.tensor(x), ...) makes
a CPU tensor, which breaks a step on a GPU. Without a GPU the same mistake is caught by moving
the default device instead of the inputs: the step runs on CPU inputs and a CPU model under
``with torch.device("meta")``, so a factory call that omits the device makes a meta tensor,
and mixing it with the CPU tensors raises, or leaves a meta tensor in the outputs. The test
asserts the step's outputs, gradients, buffers (queues) and features are CPU tensors equal to
a plain run's. What it cannot see: CPU tensors a step makes on purpose on a CPU generator
(views are drawn on the CPU by design, outside the step), and the distributed path."""
import copy

import pytest
import torch

from fastcontrast.methods import amdim, cmc, cpc, dim, moco, simclr
from fastcontrast.methods.data import ClutteredDigits, SyntheticSpeakers

IMAGES = {"width": 4}
CASES = {
    "simclr": (simclr, {**IMAGES, "feature_dim": 8, "projection_dim": 4}),
    "moco_v2": (moco, {**IMAGES, "feature_dim": 8, "projection_dim": 4, "queue_size": 12}),
    "moco_v1": (moco, {**IMAGES, "feature_dim": 8, "projection_dim": 4, "queue_size": 12,
                       "version": 1}),
    "cmc": (cmc, {**IMAGES, "out_dim": 8, "projection_dim": 4}),
    "cmc_queue": (cmc, {**IMAGES, "out_dim": 8, "projection_dim": 4, "negatives": "queue",
                        "queue_size": 10}),
    "cpc": (cpc, {"latent_dim": 3, "context_dim": 5, "encoder_width": 4,
                  "prediction_steps": 2}),
    "dim": (dim, {**IMAGES, "out_dim": 8, "head_dim": 4}),
    "dim_jsd": (dim, {**IMAGES, "out_dim": 8, "head_dim": 4, "estimator": "jsd"}),
    "amdim": (amdim, {**IMAGES, "out_dim": 8, "head_dim": 4}),
    "amdim_fused": (amdim, {**IMAGES, "out_dim": 8, "head_dim": 4, "clip": None}),
}
BATCH, STEPS = 6, 2


@pytest.fixture(scope="module")
def data():
    return {"digits": ClutteredDigits("train"),
            "speakers": SyntheticSpeakers(n_speakers=3, n_per_speaker=4, length=256, seed=1)}


def _run(method, batches, inputs):
    """STEPS of loss / backward / after_step (no optimizer: its state tensors are the
    optimizer's business), then features(inputs) in eval mode; every tensor that came out."""
    out = []
    for batch in batches:
        method.zero_grad(set_to_none=True)
        values = method.loss(batch)
        values["loss"].backward()
        method.after_step()
        out += [values[k] for k in sorted(values)]
        out += [p.grad for p in method.parameters() if p.grad is not None]
    out += list(method.buffers())
    method.eval()
    with torch.no_grad():
        out.append(method.features(inputs))
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_step_and_features_create_nothing_on_the_default_device(data, name):
    module, tiny = CASES[name]
    dataset = data[module.DEFAULTS["data"]]
    torch.manual_seed(0)
    method = module.build(backend="torch", **tiny).train()
    g = torch.Generator().manual_seed(1)
    batches = [method.views(dataset, torch.randperm(len(dataset), generator=g)[:BATCH], g)
               for _ in range(STEPS)]
    # what scoring.evaluate feeds features: the stored sequences, or the fixed renderings
    inputs = batches[0] if name == "cpc" else dataset.evaluation_set()[0][:BATCH]
    twin = copy.deepcopy(method)
    expected = _run(method, batches, inputs)
    with torch.device("meta"):
        got = _run(twin, batches, inputs)
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), i
        assert a.device == b.device == torch.device("cpu"), (i, a.device)
        assert torch.equal(a, b), (i, (a.double() - b.double()).abs().max())
