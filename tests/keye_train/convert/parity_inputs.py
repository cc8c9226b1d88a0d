"""The fixed inputs of the HF parity tests, shared by the single-rank tests and the torchrun worker."""

import torch

TOKENS = 24


def fixed_inputs(model):
    """Token ids, CE targets and one uint8 image at the ViT's native position grid."""
    ids = torch.randint(0, model.lm.vocab_size, (1, TOKENS), generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, model.lm.vocab_size, (TOKENS,), generator=torch.Generator().manual_seed(2))
    side = model.vit.patch_size * model.vit.pos_grid
    image = torch.randint(0, 256, (1, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    return ids, target, image


def feature_weights(shape):
    """The weights of the ViT's test loss <features, weights>."""
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
