"""Three places where megatron-core 0.16.1 assumes Transformer Engine, fixed for TE-less installs (CPU or GPU).

- The router GEMM reads `moe_utils.te_general_gemm`, bound only when TE imports: bind it to None, so the plain
  torch GEMM runs.
- `apply_rope_fusion` calls `rope_utils.fused_apply_rotary_pos_emb`, bound only to TE's kernel: bind our Triton
  RoPE there when TE is absent (`install_fused_rope`, for model.fusion=auto on CUDA).
- `CheckpointWithoutOutput()` (selective recompute of layernorm and moe_act) stores `fp8 = fp8 is not None`, which
  is True for its default fp8=False, and then calls TE's FP8GlobalStateManager: without TE, store False.
"""

from __future__ import annotations

_APPLIED = False


def allow_missing_transformer_engine() -> None:
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    if not tp_random.HAVE_TE:
        original = tp_random.CheckpointWithoutOutput.__init__

        def without_fp8(self, fp8=False):
            original(self, fp8)
            self.fp8 = False  # no TE, so no fp8 recipe to honour

        tp_random.CheckpointWithoutOutput.__init__ = without_fp8
    _APPLIED = True


def install_fused_rope() -> None:
    from megatron.core.models.common.embeddings import rope_utils

    from kernels.rope import fused_rope

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fused_rope
