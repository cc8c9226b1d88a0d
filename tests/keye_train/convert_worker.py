"""One rank of a sharded-import parity run (started by torchrun from test_convert.py): import an HF checkpoint
into this rank's shards, run the LM on fixed tokens with plain 1D positions, and let rank 0 save the logits,
gathered over TP, as .npy for the test to compare with transformers."""

import os
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from parallel import cpu_compat

cpu_compat.install()

from megatron.core import parallel_state, tensor_parallel  # noqa: E402

from keye_train.configure import load_config  # noqa: E402
from keye_train.convert import import_hf  # noqa: E402
from keye_train.model.builder import build_model  # noqa: E402
from keye_train.model.dsa import KeyePackedSeqParams  # noqa: E402
from keye_train.model.keye_vl import embed_inputs  # noqa: E402
from parallel.layout import check_layout, init_process_groups  # noqa: E402

TOKENS = 24


def main(hf_dir: str, out: str, overrides: list[str]) -> None:
    cfg = load_config(overrides)
    sizes = check_layout(cfg.parallel, cfg.model.lm, cfg.model.vit, int(os.environ["WORLD_SIZE"]))
    init_process_groups(cfg.parallel, sizes, "gloo")
    parts = build_model(cfg.model, cfg.parallel, torch.float32, on_gpu=False)
    import_hf(parts, cfg.model, hf_dir)
    lm = parts.lm
    ids = torch.randint(0, cfg.model.lm.vocab_size, (1, TOKENS), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(TOKENS).expand(3, -1).clone()
    cu = torch.tensor([0, TOKENS], dtype=torch.int32)
    params = KeyePackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=TOKENS,
                                 max_seqlen_kv=TOKENS, position_ids=pos)
    with torch.no_grad():
        decoder_input = embed_inputs(lm, None, types.SimpleNamespace(input_ids=ids, visual=None), cfg.model.tokens,
                                     lm.config.sequence_parallel)
        logits = lm(input_ids=ids, position_ids=pos[:, None, :], attention_mask=None, decoder_input=decoder_input,
                    packed_seq_params=params)
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)  # vocab shards -> full
    if dist.get_rank() == 0:
        np.save(Path(out) / "logits.npy", logits.numpy(), allow_pickle=False)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
