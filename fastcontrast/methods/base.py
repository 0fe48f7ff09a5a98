"""The interface every reference method implements, so that one trainer, one evaluation and the
``fastcontrast train`` command work for all of them.

A method is an ``nn.Module`` that owns its networks (encoder, heads, momentum copies, queues) and
knows how to draw its own views:

    batch = method.views(dataset, indices, generator)   # augmented views of dataset[indices]
    out = method.loss(batch)                 # {"loss": scalar tensor, "mi_bound": ..., ...}
    out["loss"].backward(); optimizer.step()
    method.after_step()                                 # momentum update, queue enqueue, ...
    features = method.features(inputs)                  # frozen features for the probes (no grad)

``loss`` returns a dict: "loss" (the scalar to minimise, a tensor with grad) and "mi_bound" (the
InfoNCE lower bound log(N) - L of its main contrastive term, a float tensor), plus any other
scalar diagnostics (e.g. per-step accuracies for CPC), all reported by the trainer.
"""
from torch import nn


class ContrastiveMethod(nn.Module):
    """Base class: subclasses implement ``views``, ``loss`` and ``features``."""

    #: short name used by ``fastcontrast train NAME``
    name = "method"
    #: None on one process; "gather" or "ring" when ``trainer.fit`` trains data-parallel (the
    #: method then computes its loss with ``fastcontrast.distributed`` over ``group``)
    distributed_mode = None
    group = None
    #: whether ``loss`` has a data-parallel form (fastcontrast.distributed over every rank's
    #: batch); without one, data-parallel training would give each rank's shard its own loss,
    #: a different objective from one process on the global batch, so ``fit`` refuses it
    data_parallel = False

    def world_size(self):
        """Processes the batch is split over (1 unless training data-parallel)."""
        if self.distributed_mode is None:
            return 1
        import torch.distributed as dist

        return dist.get_world_size(self.group)

    def views(self, dataset, indices, generator):
        """The batch ``loss`` takes: augmented views of the samples ``indices`` of ``dataset``."""
        raise NotImplementedError

    def loss(self, batch):
        """{"loss": scalar tensor, "mi_bound": scalar tensor, ...other scalar diagnostics}."""
        raise NotImplementedError

    def after_step(self):
        """Called after each optimizer step (momentum encoders, queues); nothing by default."""

    def features(self, inputs):
        """(B, F) frozen representation used by the linear probe and kNN evaluation."""
        raise NotImplementedError


class MethodCall(nn.Module):
    """One function of a method (named by the subclass's ``call``: "loss", "features") as the
    forward of a module holding the method, for what takes a module: DistributedDataParallel
    (its parameters are the method's), ``evaluate.extract_features`` (eval mode)."""

    call = None

    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, inputs):
        return getattr(self.method, self.call)(inputs)
