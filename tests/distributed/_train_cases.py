"""The training cases run inside the shared W = 2 spawn (``_train_workers.world2_results``):
``trainer.fit`` data-parallel against one process on the full batch, and MoCo's replicated
queue."""
import math

import torch
from torch import nn

from fastcontrast.methods.base import ContrastiveMethod
from fastcontrast.methods.cmc import CMC

FIT = {"steps": 5, "batch_size": 16, "lr": 0.2, "optimizer": "sgd", "seed": 3,
       "progress": False}


class PairData:
    """40 fixed float64 samples and a fixed perturbation per sample (the second view)."""

    def __init__(self):
        g = torch.Generator().manual_seed(5)
        self.x = torch.randn(40, 6, generator=g, dtype=torch.float64)
        self.noise = 0.3 * torch.randn(40, 6, generator=g, dtype=torch.float64)

    def __len__(self):
        return len(self.x)


class TinyMethod(ContrastiveMethod):
    """NT-Xent on (x, x + noise) through a per-sample MLP: views depend on the indices only,
    so one process and W ranks see the same global batches."""

    name = "tiny"
    data_parallel = True

    def __init__(self, fallback=False):
        super().__init__()
        from ._train_workers import TinyTower

        self.fallback = fallback
        torch.manual_seed(0)
        self.encoder = TinyTower(6, 4, dropout=0.0).double()

    def views(self, dataset, indices, generator):
        return {"a": dataset.x[indices], "b": dataset.x[indices] + dataset.noise[indices]}

    def loss(self, batch):
        import fastcontrast as fc

        z1, z2 = self.encoder(batch["a"]), self.encoder(batch["b"])
        if self.distributed_mode is None:
            loss = fc.nt_xent(z1, z2, temperature=0.5, backend="reference")
        else:
            loss = distributed_nt_xent(z1, z2, "fallback" if self.fallback else
                                       self.distributed_mode)
        n = 2 * z1.shape[0] * self.world_size()
        return {"loss": loss, "mi_bound": math.log(n - 1) - loss.detach()}

    def features(self, inputs):
        return self.encoder(inputs)


class TinyCMC(CMC):
    """CMC itself (its loss, pairs and fastcontrast.distributed path) on three views of
    PairData through per-sample towers instead of BatchNorm encoders (batch statistics would
    differ per rank): views depend on the indices only. Full graph: three symmetric pair terms."""

    def __init__(self):
        super().__init__(views=("low", "high", "full"), graph="full", temperature=0.5,
                         projection_dim=4, width=2, out_dim=4, backend="torch")
        from ._train_workers import TinyTower

        torch.manual_seed(1)
        self.encoders = nn.ModuleList(nn.Sequential(nn.Flatten(), TinyTower(6, 4, dropout=0.0))
                                      for _ in range(3))
        self.heads = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.double()

    def views(self, dataset, indices, generator):
        x, noise = dataset.x[indices], dataset.noise[indices]
        return {"views": [v.reshape(-1, 1, 2, 3) for v in (x, x + noise, x - 0.5 * noise)],
                "index": torch.as_tensor(indices)}


def _fit_cmc(mode=None):
    from fastcontrast.methods import trainer

    method = TinyCMC()
    history = trainer.fit(method, PairData(), distributed_mode=mode or "gather", **FIT)
    return {"params": [p.detach().clone() for p in method.parameters()],
            "losses": history.step_loss, "bounds": history.step_mi_bound,
            "world_size": history.settings["world_size"]}


def distributed_nt_xent(z1, z2, mode):
    import fastcontrast as fc

    from ._train_workers import _GatherAll, has_fcd

    if has_fcd() and mode != "fallback":
        from fastcontrast import distributed as fcd

        return fcd.nt_xent(z1, z2, temperature=0.5, mode=mode)
    return fc.nt_xent(_GatherAll.apply(z1), _GatherAll.apply(z2), temperature=0.5,
                      backend="reference")


def _fit_tiny(mode=None):
    from fastcontrast.methods import trainer

    method = TinyMethod(fallback=mode == "fallback")
    history = trainer.fit(method, PairData(), distributed_mode="ring" if mode == "ring" else
                          "gather", **FIT)
    return {"params": [p.detach().clone() for p in method.parameters()],
            "losses": history.step_loss, "bounds": history.step_mi_bound,
            "world_size": history.settings["world_size"]}


def _moco_queue():
    from fastcontrast.methods import moco, trainer

    train, _ = trainer.datasets("digits")
    torch.manual_seed(0)
    method = moco.build(width=4, feature_dim=16, projection_dim=8, queue_size=64)
    history = trainer.fit(method, train, steps=2, batch_size=16, lr=1e-3, seed=0,
                          progress=False, distributed_mode="gather")
    return {"queue": method.queue.negatives().clone(),
            "indices": method.queue.stored_indices().clone(), "losses": history.step_loss}


def distributed_cases(rank, world_size):
    from ._train_workers import has_fcd

    modes = ["fallback"] + (["gather", "ring"] if has_fcd() else [])
    return {"fit": {mode: _fit_tiny(mode) for mode in modes}, "moco": _moco_queue(),
            "cmc_fit": {mode: _fit_cmc(mode) for mode in ("gather", "ring")}}


def references():
    return {"fit_reference": _fit_tiny(), "cmc_reference": _fit_cmc()}
