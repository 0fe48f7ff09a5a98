"""Multi-GPU / multi-node contrastive losses on torch.distributed (NCCL on GPU, gloo on CPU;
launched by torchrun): every rank passes its local batch and gets the negatives of every rank,
without ever forming the logits.

    from fastcontrast import distributed as fcd
    loss = fcd.info_nce(query, key, negatives=None, *, mode="gather", group=None, **kwargs)
    loss = fcd.clip_loss(image, text, logit_scale, *, logit_bias=None, mode=..., group=...)
    loss = fcd.nt_xent(z1, z2, *, temperature=0.5, decoupled=True, mode=..., group=...)
    loss = fcd.supcon(features, labels, *, temperature=0.1, mode=..., group=...)
    loss = fcd.siglip_loss(image, text, logit_scale, logit_bias, *, mode=..., group=...)
    loss = fcd.moco_loss(query, key, queue, *, mode=..., group=...)
    loss = fcd.distill_info_nce(sq, sk, tq, tk, *, temperature, teacher_temperature, ...)
    keys = fcd.all_gather_with_grad(tensor, group=None)   # rank order, exact backward
    fcd.enqueue_all(queue, keys, group=None)              # every rank's keys, rank order

Every function takes the arguments of its single-process twin in fastcontrast (same names,
same defaults) plus ``mode`` and ``group`` (a torch.distributed group; None: all processes).

Convention (W = the size of the group):
  * Forward: each rank returns the loss of its own rows, scaled so that the MEAN over the ranks
    of the returned losses equals the single-process loss on the concatenated batch (the ranks'
    batches in rank order), whatever the per-rank counts (uneven batch sizes, SupCon anchors
    without positives). reduction="none" returns this rank's rows.
  * Backward: every rank's inputs receive the gradient of the SUM of all ranks' returned
    losses. DDP averages parameter gradients over the W ranks, which then equals exactly the
    single-process gradient. Every rank must run the backward (it communicates).
  * Scalar parameters (temperature, logit_scale, logit_bias) are never all-reduced inside the
    ops: each rank's gradient is its rows' share, and DDP's average is the single-process
    gradient.

Modes:
  "gather"  all-gather the keys (O(M_total D) per rank), local rows against all keys in one
            fused kernel call; symmetric losses merge the column log-sum-exps across ranks in
            log space (O(M_total) floats); backward all-gathers the column weights (O(M_total))
            and reduce-scatters the key gradients (O(M_total D)). Uneven batches work.
  "ring"    key blocks travel around the ring with isend / irecv posted before each block's
            compute: per rank its own block plus two travelling blocks (the one computed on and
            the arriving one), and in the backward one fp32 key-gradient accumulator (two
            during its hand-over) and a quarter-block partial; the forward saves O(N_r + M_r)
            statistics, no key block. The partial column statistics (forward) and the
            key-gradient accumulators (backward) travel with their block and come home
            complete; a symmetric loss is one ring forward and one ring backward. Uneven
            (non-empty) batches work.
Every call starts with one small all_gather of shapes, dtypes and options, so mismatched
inputs raise the same ValueError on every rank instead of hanging; a rank whose own inputs fail
a check (an empty batch, targets out of range, ...) joins that exchange with a failure status
and raises its error, the other ranks a ValueError naming it. Every collective inherits the
process group's timeout.

Objectives: the DCL / DCLW / HCL options and the id masks (query_ids / negative_ids,
moco_loss's query_index) work in both modes over the candidates of every rank (DCLW's softmax
over the rows of all ranks, HCL's negative counts over all ranks; see objectives.py); "mean"
then counts the rows of all ranks that kept a negative, as single-process. False-negative
filtering (false_negatives.py, filtered.py) and similarity distillation (distill.py,
distill_ops.py) work in both modes over the candidates of every rank.
"""
from .api import MODES, clip_loss, enqueue_all, info_nce, moco_loss, nt_xent, siglip_loss, supcon
from .collectives import all_gather_with_grad, all_reduce_with_grad
from .distill import distill_info_nce

__all__ = ["info_nce", "clip_loss", "nt_xent", "supcon", "siglip_loss", "moco_loss",
           "all_gather_with_grad", "all_reduce_with_grad", "enqueue_all", "MODES",
           "distill_info_nce"]
