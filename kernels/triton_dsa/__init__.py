"""The "triton" DSA backend (see kernels/dsa.py). Kernels run on CUDA tensors, or on CPU tensors under
TRITON_INTERPRET=1 (how CI checks them). Indexer scores + exact top-k, sparse GQA attention and the sparse-stage
indexer KL are Triton kernels; the dense warm-up KL runs the torch reference."""

from kernels import interpreter_compat

interpreter_compat.apply()

from kernels.triton_dsa.indexer import indexer_topk, indexer_topk_cached  # noqa: F401,E402
from kernels.triton_dsa.indexer_kl import indexer_kl_loss  # noqa: F401,E402
from kernels.triton_dsa.sparse_attention import sparse_gqa_attention  # noqa: F401,E402
