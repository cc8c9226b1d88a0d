"""Four places where megatron-core 0.16.1 assumes Transformer Engine, fixed for TE-less installs (CPU or GPU),
and one shape bug.

- The router GEMM reads `moe_utils.te_general_gemm`, bound only when TE imports: bind it to None, so the plain
  torch GEMM runs.
- `apply_rope_fusion` calls `rope_utils.fused_apply_rotary_pos_emb`, bound only to TE's kernel: bind our Triton
  RoPE there when TE is absent (`install_fused_rope`, for model.fusion=auto on CUDA).
- Without apex, the gradient norm for clipping (`clip_grads.l2_norm_impl`) takes one norm per tensor and reads
  each back to the host (a sync per parameter: 374 per step at 4 LM layers): bind a `torch._foreach_norm` one that
  stays on the device.
- The MoE aux-loss scale is created as a 0-d tensor by a backward that runs outside megatron's schedule (a
  plain `loss.backward()`), and the schedule later copies its [1]-shaped scale into it, which fails: copy the
  scale in the held tensor's shape.
- `CheckpointWithoutOutput()` (selective recompute of layernorm and moe_act) stores `fp8 = fp8 is not None`, which
  is True for its default fp8=False, and then calls TE's FP8GlobalStateManager: without TE, store False.
"""

from __future__ import annotations

_APPLIED = False


def allow_missing_transformer_engine() -> None:
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core.optimizer import clip_grads
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.moe import moe_utils

    if clip_grads.l2_norm_impl is getattr(clip_grads, "local_multi_tensor_l2_norm", None):
        clip_grads.l2_norm_impl = foreach_l2_norm
    scaler = moe_utils.MoEAuxLossAutoScaler

    def set_loss_scale(scale):
        if scaler.main_loss_backward_scale is None:
            scaler.main_loss_backward_scale = scale
        else:
            scaler.main_loss_backward_scale.copy_(scale.reshape(scaler.main_loss_backward_scale.shape))

    scaler.set_loss_scale = staticmethod(set_loss_scale)
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    if not tp_random.HAVE_TE:
        original = tp_random.CheckpointWithoutOutput.__init__

        def without_fp8(self, fp8=False):
            original(self, fp8)
            self.fp8 = False  # no TE, so no fp8 recipe to honour

        tp_random.CheckpointWithoutOutput.__init__ = without_fp8
    _APPLIED = True


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """amp_C.multi_tensor_l2norm's contract (the L2 norm of all tensors of tensor_lists[0], as a [1] fp32 tensor),
    without a host round trip."""
    import torch

    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def install_fused_rope() -> None:
    from megatron.core.models.common.embeddings import rope_utils

    from kernels.rope import fused_rope

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fused_rope
