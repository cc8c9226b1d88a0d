"""Input precision of the kernels' tl.dot, chosen like torch's own matmuls."""

import torch


def dot_precision(dtype: torch.dtype) -> str:
    """For operands that come from `dtype` tensors: float32 runs in TF32 only when torch allows it for matmuls
    (torch.backends.cuda.matmul.allow_tf32, off by default), otherwise exact ("ieee"); bf16 and fp16 values are
    exact in TF32, so their dots keep Triton's default."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# The lightning indexer's dots (scores and the KL's logits and gradients) always take TF32 inputs with fp32
# accumulation: the indexer only ranks keys (DeepSeek runs it in FP8), its inputs arrive in fp32 from its norms
# even in bf16 training, and exact fp32 dots would run on the CUDA cores at a fraction of the rate.
INDEXER_DOT_PRECISION = "tf32"
