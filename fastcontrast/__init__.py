"""fastcontrast: fused, memory-efficient contrastive losses for PyTorch.

    import fastcontrast as fc
    loss = fc.info_nce(query, key, temperature=0.07)          # InfoNCE, key i positive of query i
    loss = fc.clip_loss(image_features, text_features, logit_scale)

The N x M similarity matrix is never materialised: the fused backends stream it in tiles.
"""
from .functional import available_backends, clip_loss, info_nce
from .losses import ClipLoss, InfoNCELoss

__version__ = "0.1.0"
__all__ = ["info_nce", "clip_loss", "InfoNCELoss", "ClipLoss", "available_backends",
           "__version__"]
