"""The "triton" DSA backend (see kernels/dsa.py). Kernels run on CUDA tensors, or on CPU tensors under
TRITON_INTERPRET=1 (how CI checks them). Indexer scores + exact top-k and sparse GQA attention are Triton
kernels; the indexer KL still runs the torch reference here until its kernel lands."""

from kernels.dsa_reference import indexer_kl_loss  # noqa: F401  (reference until the kernel lands)
from kernels.triton_dsa.indexer import indexer_topk  # noqa: F401
from kernels.triton_dsa.sparse_attention import sparse_gqa_attention  # noqa: F401
