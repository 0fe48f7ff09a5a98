"""Shapes, receptive fields and input checks of the small encoders the methods share."""
import pytest
import torch

from fastcontrast.methods.encoders import SequenceEncoder, SmallConvEncoder


@pytest.mark.parametrize("side", [24, 17, 4])
@pytest.mark.parametrize("channels", [1, 3])
def test_small_conv_encoder_shapes(side, channels):
    enc = SmallConvEncoder(in_channels=channels, out_dim=48, width=8)
    x = torch.randn(5, channels, side, side)
    maps = enc.feature_maps(x)
    assert [m.shape for m in maps] == [(5, 8, side // 2, side // 2),
                                       (5, 16, side // 4, side // 4),
                                       (5, 48, side // 4, side // 4)]
    out = enc(x)
    assert out.shape == (5, 48) and enc.feature_dim == 48
    torch.testing.assert_close(out, maps[-1].mean((2, 3)))


def test_sequence_encoder_shape_and_receptive_field():
    enc = SequenceEncoder(feature_dim=12, width=8).double().eval()
    x = torch.randn(2, 1, 512, dtype=torch.float64, requires_grad=True)
    z = enc(x)
    assert z.shape == (2, 12, 512 // 16)
    z[0, :, 16].sum().backward()                 # an interior latent
    seen = x.grad[0, 0].nonzero().flatten()
    assert seen.max() - seen.min() + 1 == 76, "the documented receptive field"
    assert 16 * 16 <= seen.max() and seen.min() <= 16 * 16   # latent j covers sample 16 j


def test_encoders_reject_bad_input():
    with pytest.raises(ValueError, match=r"x must be \(B, 1, H, W\), got shape \(2, 3, 8, 8\)"):
        SmallConvEncoder()(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="T a multiple of 16, got shape"):
        SequenceEncoder()(torch.zeros(2, 1, 100))
    with pytest.raises(ValueError, match="out_dim must be >= 1"):
        SmallConvEncoder(out_dim=0)
    with pytest.raises(TypeError, match="width must be an int"):
        SequenceEncoder(width=2.0)
