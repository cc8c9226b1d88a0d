"""One CP rank of test_context_parallel.py (started by torchrun; gloo, float64, CP = world size).

Every rank builds the same packed sequence (uneven documents, some shorter than 2*cp, padding), computes the
one-rank reference on the unpadded sequence, then its own CP slice through the model's CP paths with the real
all-gather / reduce-scatter, and compares: dense attention, the DSA warm-up and the sparse stage (selected sets,
KL, outputs and every gradient, row for row). Writes report_<rank>.json with the worst errors.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.context_parallel import context_shard, padded_length
from kernels import dsa as dsa_ops
from kernels.dense_attention import dense_varlen_attention_loop
from keye_train.model.context_parallel import context_attention, context_dsa
from parallel import context

LENGTHS = [13, 3, 1, 40, 7, 22]  # documents shorter than 2*cp, uneven ones
HEADS, KV_HEADS, DIM, INDEX_HEADS, INDEX_DIM, TOPK, SCALE, KL_COEFF = 4, 2, 8, 2, 8, 6, 0.35, 0.7


def padded_layout(cp: int):
    """Per-document padded lengths, the pad flags [S'] and, per padded row, its unpadded row (-1 on pads)."""
    padded = [-(-n // (2 * cp)) * 2 * cp for n in LENGTHS]
    padded[-1] += padded_length(LENGTHS, cp) - sum(padded)
    pad, real_row, real = [], [], 0
    for n, p in zip(LENGTHS, padded):
        pad += [False] * n + [True] * (p - n)
        real_row += list(range(real, real + n)) + [-1] * (p - n)
        real += n
    return padded, torch.tensor(pad), torch.tensor(real_row)


def inputs(total: int):
    g = torch.Generator().manual_seed(11)
    shapes = {
        "q": (HEADS, DIM),
        "k": (KV_HEADS, DIM),
        "v": (KV_HEADS, DIM),
        "index_q": (INDEX_HEADS, INDEX_DIM),
        "index_w": (INDEX_HEADS,),
        "index_k": (INDEX_DIM,),
        "up": (HEADS, DIM),
    }
    return {name: torch.randn(total, *shape, generator=g, dtype=torch.float64) for name, shape in shapes.items()}


def reference(full: dict, real: torch.Tensor, mode: str):
    """One rank on the unpadded sequence: (out, indices, kl, grads) with loss = sum(out * up) + KL_COEFF * kl."""
    leaves = {k: v[real].clone().requires_grad_() for k, v in full.items() if k != "up"}
    cu = torch.tensor([0] + LENGTHS).cumsum(0).int()
    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    index = (leaves["index_q"], leaves["index_w"], leaves["index_k"])
    indices = None
    if mode == "dense":
        out = dense_varlen_attention_loop(q, k, v, cu, causal=True, scale=SCALE)
    elif mode == "sparse":
        indices = dsa_ops.indexer_topk(*(x.detach() for x in index), cu, TOPK, backend="torch")
        out, _ = dsa_ops.sparse_gqa_attention(q, k, v, indices, SCALE, backend="torch")
    else:  # warm-up: dense attention, KL over every causal key
        out = dense_varlen_attention_loop(q, k, v, cu, causal=True, scale=SCALE)
    loss = (out * full["up"][real]).sum()
    kl = None
    if mode != "dense":
        kl = dsa_ops.indexer_kl_loss(*index, q, k, cu, SCALE, indices=indices, backend="torch")
        loss = loss + KL_COEFF * kl
    loss.backward()
    return out.detach(), indices, kl, {name: x.grad for name, x in leaves.items()}


def context_run(full: dict, shard, pad_rows: torch.Tensor, mode: str):
    """This rank's slice through the model's CP path; the same loss on real rows (pad rows carry no gradient).
    As in training, the KL sum is weighted cp / T per row (kl_row_weights) and DDP averages gradients over CP:
    here the KL enters divided by cp, so each rank's gradients add up to the one-rank gradients."""
    rows = shard.rows
    leaves = {k: v[rows].clone().requires_grad_() for k, v in full.items() if k != "up"}
    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    up = full["up"][rows] * (~pad_rows)[:, None, None]
    indices = kl = None
    if mode == "dense":
        out = context_attention(q, k, v, shard, SCALE, backend="loop")
    else:
        index = (leaves["index_q"], leaves["index_w"], leaves["index_k"])
        dsa_mode = "sparse" if mode == "sparse" else "warmup"
        out, indices, kl = context_dsa(q, k, v, *index, shard, dsa_mode, TOPK, SCALE, kl=True, backend="torch")
    loss = (out * up).sum() + (KL_COEFF * kl / shard.cp if kl is not None else 0.0)
    loss.backward()
    return out.detach(), indices, kl, {name: x.grad for name, x in leaves.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def main(out_dir: str):
    dist.init_process_group("gloo")
    cp, rank = dist.get_world_size(), dist.get_rank()
    context.setup(dist.group.WORLD)
    padded, pad, real_row = padded_layout(cp)
    full = inputs(sum(padded))
    real = ~pad
    shard = context_shard(padded, cp, rank)
    shard.pad, shard.real_length = pad[shard.rows], sum(LENGTHS)
    local_real = real_row[shard.rows]
    keep = local_real >= 0
    report = {"rank": rank, "cp": cp}
    for mode in ("dense", "warmup", "sparse"):
        ref_out, ref_indices, ref_kl, ref_grads = reference(full, real, mode)
        out, indices, kl, grads = context_run(full, shard, shard.pad, mode)
        errors = {"out": rel(out[keep], ref_out[local_real[keep]])}
        for name, grad in grads.items():
            if mode == "dense" and name.startswith("index"):
                continue
            expected = ref_grads[name][local_real[keep]]
            errors[f"d{name}"] = rel(grad[keep], expected)
            assert not grad[~keep].any(), (mode, name, "gradient on a pad row")
        if kl is not None:
            total = kl.detach().clone()  # sums over CP ranks to cp x the one-rank mean
            dist.all_reduce(total)
            errors["kl"] = abs(float(total) / cp - float(ref_kl)) / abs(float(ref_kl))
        if indices is not None:  # global padded positions -> unpadded positions: the same sets as one rank's
            mapped = torch.where(indices >= 0, real_row[indices.clamp(min=0).long()], -1)
            assert (mapped[keep] >= -1).all()
            same = torch.equal(mapped[keep].int(), ref_indices[local_real[keep]])
            report[f"{mode}_same_indices"] = same
            assert same, (mode, mapped[keep][:4], ref_indices[local_real[keep]][:4])
        worst = max(errors.values())
        report[mode] = errors
        assert worst < 1e-10, (mode, errors)
    Path(out_dir, f"report_{rank}.json").write_text(json.dumps(report))
    context.teardown()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
