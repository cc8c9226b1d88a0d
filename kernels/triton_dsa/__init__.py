"""The "triton" DSA backend (see kernels/dsa.py). Kernels run on CUDA tensors, or on CPU tensors under
TRITON_INTERPRET=1 (how CI checks them). Sparse GQA attention is a Triton kernel; the indexer top-k and the
indexer KL still run the torch reference here until their kernels land."""

from kernels.dsa_reference import indexer_kl_loss, indexer_topk  # noqa: F401  (reference until the kernels land)
from kernels.triton_dsa.sparse_attention import sparse_gqa_attention  # noqa: F401
