"""fastcontrast: fused, memory-efficient contrastive losses for PyTorch.

    import fastcontrast as fc
    loss = fc.info_nce(query, key, temperature=0.07)          # InfoNCE, key i positive of query i
    loss = fc.clip_loss(image_features, text_features, logit_scale)
    loss = fc.nt_xent(z1, z2, temperature=0.5)                  # SimCLR (also DCL / DCLW / HCL)
    loss = fc.supcon(features, labels, temperature=0.1)         # supervised contrastive
    loss = fc.moco_loss(query, key, queue, temperature=0.07)    # MoCo with a negative queue
    loss = fc.siglip_loss(image, text, logit_scale, logit_bias)  # SigLIP pairwise sigmoid loss
    loss = fc.distill_info_nce(sq, sk, tq, tk, temperature=0.07, teacher_temperature=0.07)
    contrastive, distill = fc.distill_clip_loss(image, text, t_image, t_text, scale, t_scale)
    queue = fc.NegativeQueue(65536, 128); queue.enqueue(keys)   # ring buffer, any batch size
    fc.momentum_update(key_encoder, query_encoder, m=0.999)     # fused EMA of all parameters
    fc.gradcache_step([enc, enc], [x1, x2], fc.nt_xent, chunk_size=64)  # batch >> memory

The N x M similarity matrix is never materialised: the fused backends stream it in tiles.
"""
from .functional import (available_backends, clip_loss, distill_clip_loss, distill_info_nce,
                         info_nce, moco_loss, nt_xent, siglip_loss, supcon)
from .losses import (ClipLoss, DistillClipLoss, DistillInfoNCELoss, InfoNCELoss, MoCoLoss,
                     NTXentLoss, SigLIPLoss, SupConLoss)
from .gradcache import gradcache_step
from .momentum import momentum_update
from .queue import NegativeQueue

__version__ = "0.1.0"
__all__ = ["info_nce", "clip_loss", "nt_xent", "supcon", "moco_loss", "siglip_loss", "InfoNCELoss",
           "ClipLoss", "NTXentLoss", "SupConLoss", "MoCoLoss", "SigLIPLoss", "NegativeQueue",
           "momentum_update", "gradcache_step", "available_backends", "__version__",
           "distill_info_nce", "DistillInfoNCELoss", "distill_clip_loss", "DistillClipLoss"]
