"""What "equal to the peer" means in the compat tests: (rtol, atol) per dtype, for values and
gradients computed by the peer and by its fastcontrast.compat twin on the same inputs."""
import torch

PARITY = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-5, 2e-5)}
