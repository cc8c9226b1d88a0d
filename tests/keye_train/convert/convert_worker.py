"""One rank of a sharded-import parity run (started by torchrun from test_convert.py).

Imports a transformers Qwen3-MoE checkpoint into this rank's LM shards and a SigLIP tower into the ViT, runs both
on fixed inputs (plain 1D positions; the ViT with zero RoPE angles on one image at its native grid), backpropagates
CE(logits) + <features, weights> through megatron DDP and `finalize_model_grads` as training does, and lets rank 0
save the logits and features (.npy) and every gradient, gathered whole and named as Keye-VL-2.0 HF tensors
(grads.safetensors)."""

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
from megatron.core.distributed import finalize_model_grads  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from data_pipeline.batch import VisualInput  # noqa: E402
from data_pipeline.pixels import to_patches  # noqa: E402
from keye_train.config.compose import load_config  # noqa: E402
from keye_train.convert.exporter import gather_full_tensors  # noqa: E402
from keye_train.convert.hf_names import keye_hf_tensors  # noqa: E402
from keye_train.convert.importer import import_hf  # noqa: E402
from keye_train.model import vision  # noqa: E402
from keye_train.model.builder import build_model  # noqa: E402
from keye_train.model.keye_vl import embed_inputs  # noqa: E402
from keye_train.training.optim import wrap_ddp  # noqa: E402
from parallel.layout import check_layout, init_process_groups  # noqa: E402
from parallel.placement import ColocatedPlacement  # noqa: E402
from tests.keye_train.convert.parity_inputs import TOKENS, feature_weights, fixed_inputs  # noqa: E402
from tests.keye_train.model.lm_loss import one_document_params  # noqa: E402


def grad_of(param):
    """DDP's reduced buffer for the LM, plain .grad for the ViT, zeros for the unused projector."""
    for grad in (getattr(param, "main_grad", None), param.grad):
        if grad is not None:
            return grad
    return torch.zeros_like(param)


def main(lm_dir: str, vit_dir: str, out: str, overrides: list[str]) -> None:
    cfg = load_config(overrides)
    sizes = check_layout(cfg.parallel, cfg.model.lm, cfg.model.vit, int(os.environ["WORLD_SIZE"]))
    init_process_groups(cfg.parallel, sizes, "gloo")
    parts = build_model(cfg.model, cfg.parallel, torch.float32, False, ColocatedPlacement())
    import_hf(parts, cfg.model, lm_dir)
    import_hf(parts, cfg.model, vit_dir)
    lm = wrap_ddp(parts.lm, distributed_optimizer=False)

    ids, target, image = fixed_inputs(cfg.model)
    params = one_document_params(TOKENS)
    pos = params.position_ids
    decoder_input = embed_inputs(
        parts.lm,
        None,
        types.SimpleNamespace(input_ids=ids, visual=None),
        cfg.model.tokens,
        parts.lm.config.sequence_parallel,
    )
    logits = lm(
        input_ids=ids,
        position_ids=pos[:, None, :],
        attention_mask=None,
        decoder_input=decoder_input,
        packed_seq_params=params,
    )
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)  # vocab shards -> full

    vision.vit_rope_angles = lambda grids, dim, theta: torch.zeros(int(grids.prod(1).sum()), dim)
    side = image.shape[-1]
    features = parts.vision.encoder(VisualInput(*to_patches(image, side, side)))
    loss = torch.nn.functional.cross_entropy(logits[0].double(), target)
    loss = loss + (features.double() * feature_weights(features.shape)).sum()
    loss.backward()
    finalize_model_grads([lm])  # DP all-reduce (EP-aware) and the SP norm-weight sums over TP

    grads = gather_full_tensors(parts, torch.float32, grad_of)
    if dist.get_rank() == 0:
        named = keye_hf_tensors(
            {
                name: grad
                for name, grad in grads.items()
                if name.startswith("lm.") or name.startswith("vision.encoder.")
            },
            cfg.model,
        )
        save_file({k: v.contiguous() for k, v in named.items()}, str(Path(out) / "grads.safetensors"))
        np.save(Path(out) / "logits.npy", logits.detach().numpy(), allow_pickle=False)
        np.save(Path(out) / "features.npy", features.detach().numpy(), allow_pickle=False)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
