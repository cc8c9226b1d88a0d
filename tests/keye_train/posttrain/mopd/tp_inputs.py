"""The toy logits of the vocab-parallel test (shared by the test and its worker)."""

import torch


def inputs():
    g = torch.Generator().manual_seed(5)
    student = 2 * torch.randn(12, 16, generator=g, dtype=torch.float64)
    teacher = 3 * torch.randn(12, 16, generator=g, dtype=torch.float64)
    return student, teacher, torch.randint(0, 16, (12,), generator=g), 5
