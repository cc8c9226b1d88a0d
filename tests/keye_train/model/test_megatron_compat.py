"""The TE/apex-less replacements bound into megatron-core: the gradient-norm kernel keeps amp_C's contract."""

import torch

from keye_train.model.megatron_compat import allow_missing_transformer_engine, foreach_l2_norm


def test_foreach_l2_norm_is_the_norm_of_all_tensors():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=g) for shape in ((7,), (3, 5), (1,), (4, 4, 2))]
    norm, per_tensor = foreach_l2_norm(2048 * 32, None, [tensors], False)
    expected = torch.cat([t.double().flatten() for t in tensors]).norm()
    assert norm.shape == (1,) and norm.dtype == torch.float32 and per_tensor is None
    torch.testing.assert_close(norm.double(), expected.reshape(1), rtol=1e-6, atol=0)


def test_bound_into_megatrons_clip_grads():
    from megatron.core.optimizer import clip_grads

    allow_missing_transformer_engine()
    assert clip_grads.l2_norm_impl is foreach_l2_norm


def test_the_moe_aux_loss_scale_takes_the_schedules_shape_after_a_plain_backward():
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    allow_missing_transformer_engine()
    held = MoEAuxLossAutoScaler.main_loss_backward_scale
    try:
        MoEAuxLossAutoScaler.main_loss_backward_scale = torch.tensor(1.0)  # what a plain backward leaves
        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1) * 0.5)  # what the schedule passes
        assert MoEAuxLossAutoScaler.main_loss_backward_scale.item() == 0.5
    finally:
        MoEAuxLossAutoScaler.main_loss_backward_scale = held
