"""HF interop: a tiny transformers Qwen3-MoE imported into our LM gives the same logits and gradients (ours in
fp32 against transformers in float64, plain 1D positions, where M-RoPE with equal t/h/w ids is RoPE); Keye-VL-2.0
export -> import -> export is the identity, the unused ViT packing table included."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from keye_train.config import tiny
from tests.helpers import REPO

transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e '.[test]'")


def build(model, seed=None, dtype=torch.float32):
    from keye_train.config import ParallelConfig
    from keye_train.model.builder import build_model, initialize_weights
    from parallel.placement import ColocatedPlacement

    parts = build_model(model, ParallelConfig(), dtype, False, ColocatedPlacement())
    if seed is not None:
        initialize_weights(parts, model, seed)
    return parts


def lm_logits(lm, ids):
    from tests.keye_train.model.lm_loss import lm_token_losses

    return lm_token_losses(lm, ids)


def grads_in_keye_names(parts, model, prefix):
    """Our gradients of the parameters under `prefix`, named and shaped as Keye-VL-2.0 HF tensors."""
    from keye_train.convert.hf_names import keye_hf_tensors
    from keye_train.model.builder import parameter_shards

    return keye_hf_tensors(
        {info.name: param.grad for param, info in parameter_shards(parts) if info.name.startswith(prefix)}, model
    )


def tiny_qwen3_moe(model, seed=0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    lm = model.lm
    config = Qwen3MoeConfig(
        vocab_size=lm.vocab_size,
        hidden_size=lm.hidden_size,
        num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_heads,
        num_key_value_heads=lm.num_kv_heads,
        head_dim=lm.head_dim,
        intermediate_size=4 * lm.hidden_size,
        moe_intermediate_size=lm.moe_ffn_hidden_size,
        num_experts=lm.num_experts,
        num_experts_per_tok=lm.moe_topk,
        norm_topk_prob=True,
        rms_norm_eps=lm.norm_eps,
        rope_theta=lm.rope_theta,
        max_position_embeddings=lm.max_position_embeddings,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=False,
        attention_bias=False,
        experts_implementation="eager",
    )  # float64 needs the loop
    torch.manual_seed(seed)
    hf = Qwen3MoeForCausalLM(config).double().eval()
    with torch.no_grad():  # random everything, norms around 1, a decisive router
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 1.0 if name.endswith("mlp.gate.weight") else 0.05)
    return hf


def tiny_siglip(model, seed=5):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    vit = model.vit
    config = SiglipVisionConfig(
        hidden_size=vit.hidden_size,
        intermediate_size=vit.ffn_hidden_size,
        num_hidden_layers=vit.num_layers,
        num_attention_heads=vit.num_heads,
        image_size=vit.patch_size * vit.pos_grid,
        patch_size=vit.patch_size,
        layer_norm_eps=vit.norm_eps,
        hidden_act="gelu_pytorch_tanh",
        vision_use_head=False,
    )
    torch.manual_seed(seed)
    hf = SiglipVisionModel(config).double().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(
                1 + 0.2 * torch.randn_like(p)
                if "norm" in name and name.endswith("weight")
                else 0.05 * torch.randn_like(p)
            )
    return hf


def lm_reference(hf, ids, target):
    """transformers' float64 logits, with the gradients of CE(logits, target) left in .grad."""
    theirs = hf(ids).logits
    torch.nn.functional.cross_entropy(theirs[0], target).backward()
    return theirs.detach()


def vit_reference(hf, image, weights):
    """transformers' float64 SigLIP features of one uint8 image, gradients of <features, weights> in .grad."""
    theirs = hf(pixel_values=image.double() / 127.5 - 1.0).last_hidden_state[0]
    (theirs * weights).sum().backward()
    return theirs.detach()


def check_close(what, ours, theirs):
    diff = (ours.double() - theirs).abs().max().item()
    print(f"{what} max abs diff {diff:.3e} (scale {theirs.abs().max().item():.2f})")
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=2e-5)


def check_lm_grads(what, hf, our_grads):
    """Every transformers Qwen3-MoE gradient against ours (named as Keye-VL HF tensors), to fp32 error; a mapping
    slip would be O(the gradient's scale)."""
    worst = worst_abs = 0.0
    for name, p in hf.named_parameters():
        got = our_grads[name].double()
        if ".mlp.experts." in name:  # Keye layout [E, in, out]; transformers 5 holds [E, out, in]
            got = got.transpose(1, 2)
        diff, scale = (got - p.grad).abs().max().item(), p.grad.abs().max().item()
        worst, worst_abs = max(worst, diff / scale), max(worst_abs, diff)
        assert scale > 0 and diff <= 1e-4 * scale, (name, diff, scale)
    print(f"{what} LM gradients max abs diff {worst_abs:.3e}, per tensor / its max abs gradient {worst:.3e}")


def check_vit_grads(what, hf, our_grads):
    worst = worst_abs = 0.0
    overall = max(p.grad.abs().max().item() for p in hf.parameters())
    for name, p in hf.named_parameters():
        got = our_grads["visual.vision_model." + name.removeprefix("vision_model.")].double()
        diff, scale = (got - p.grad).abs().max().item(), p.grad.abs().max().item()
        if name.endswith("k_proj.bias"):  # exactly zero (softmax ignores a per-query shift): fp32 noise only
            assert diff <= 1e-6 * overall, (name, diff)
            continue
        worst, worst_abs = max(worst, diff / scale), max(worst_abs, diff)
        assert scale > 0 and diff <= 1e-4 * scale, (name, diff, scale)
    print(f"{what} ViT gradients max abs diff {worst_abs:.3e}, per tensor / its max abs gradient {worst:.3e}")


@pytest.mark.parametrize("experts_impl", ["sequential", "grouped"])
def test_a_qwen3_moe_checkpoint_imports_with_the_same_logits_and_gradients(single_rank, tmp_path, experts_impl):
    from keye_train.convert.importer import import_hf
    from tests.keye_train.convert.parity_inputs import fixed_inputs

    model = tiny()
    model.lm.experts_impl = experts_impl  # megatron's per-expert loop, or our grouped GEMM
    model.lm.moe_aux_loss_coeff = 0.0  # HF adds no router loss unless asked
    hf = tiny_qwen3_moe(model)
    hf.save_pretrained(tmp_path)
    parts = build(model)  # fp32 (megatron's MoE path has no float64) against the float64 transformers reference
    report = import_hf(parts, model, tmp_path)
    assert report["unused"] == [] and all(name.startswith("vision.") for name in report["kept"])

    ids, target, _ = fixed_inputs(model)
    ours = lm_logits(parts.lm, ids)
    theirs = lm_reference(hf, ids, target)
    check_close("1 rank: logits", ours, theirs)
    torch.nn.functional.cross_entropy(ours[0].double(), target).backward()
    check_lm_grads("1 rank:", hf, grads_in_keye_names(parts, model, "lm."))


def test_keye_export_import_export_is_the_identity(single_rank, tmp_path):
    from safetensors.torch import load_file

    from keye_train.convert.exporter import export_keye_hf
    from keye_train.convert.hf_checkpoint import HFCheckpoint, passthrough_tensors
    from keye_train.convert.hf_names import PACKING_TABLE
    from keye_train.convert.importer import import_hf
    from keye_train.model.builder import parameter_shards

    model = tiny()
    model.lm.dsa = dataclasses.replace(model.lm.dsa, mode="sparse")  # with the indexers
    first = build(model, seed=3)
    table = {PACKING_TABLE: torch.randn(32, model.vit.hidden_size)}
    export_keye_hf(first, model, tmp_path / "a", passthrough=table, dtype=torch.float32, max_shard_bytes=20 << 20)
    ckpt = HFCheckpoint(tmp_path / "a")
    assert len(set(ckpt.files.values())) > 1  # sharded, with an index
    assert ckpt.get("model.layers.0.mlp.experts.gate_up_proj").shape == (8, 128, 128)  # [E, in, out]
    assert ckpt.config["sa_config"]["indexer_num_heads"] == 4 and ckpt.config["sa_config"]["topk"] == 32

    second = build(model, seed=4)
    report = import_hf(second, model, tmp_path / "a")
    assert report["unused"] == [PACKING_TABLE]
    for (p1, info), (p2, _) in zip(parameter_shards(first), parameter_shards(second)):
        assert torch.equal(p1, p2), info.name
    export_keye_hf(
        second,
        model,
        tmp_path / "b",
        passthrough=passthrough_tensors(tmp_path / "a"),
        dtype=torch.float32,
        max_shard_bytes=20 << 20,
    )
    a = {k: v for f in sorted((tmp_path / "a").glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted((tmp_path / "b").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert a.keys() == b.keys() and PACKING_TABLE in b
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_siglip_tower_imports_with_the_same_features_and_gradients(single_rank, tmp_path, monkeypatch):
    """SigLIP has no 2D RoPE: ours runs here with zero rotation angles (RoPE, packing and position interpolation
    are tested in tests/keye_train/model/test_vision.py) on one image at the table's native 4 x 4 grid."""
    from data_pipeline.batch import VisualInput
    from data_pipeline.pixels import to_patches
    from keye_train.convert.importer import import_hf
    from keye_train.model import vision
    from tests.keye_train.convert.parity_inputs import feature_weights, fixed_inputs

    model = tiny()
    hf = tiny_siglip(model)
    hf.save_pretrained(tmp_path)
    parts = build(model)
    report = import_hf(parts, model, tmp_path)
    assert report["unused"] == []
    assert {n.split(".")[0] for n in report["kept"]} == {"lm", "vision"}  # the LM and the projector stay
    assert all(n.startswith("lm.") or n.startswith("vision.projector.") for n in report["kept"])

    _, _, image = fixed_inputs(model)
    side = image.shape[-1]
    patches, grids = to_patches(image, side, side)  # the data pipeline's own patch layout
    monkeypatch.setattr(vision, "vit_rope_angles", lambda grids, dim, theta: torch.zeros(int(grids.prod(1).sum()), dim))
    ours = parts.vision.encoder(VisualInput(patches, grids))
    weights = feature_weights(ours.shape)
    theirs = vit_reference(hf, image, weights)
    check_close("1 rank: ViT features", ours, theirs)
    (ours.double() * weights).sum().backward()
    check_vit_grads("1 rank:", hf, grads_in_keye_names(parts, model, "vision.encoder."))


CLI_COMMON = ["~recipe", "model=tiny", "attention=sparse", "parallel.nproc=2"]


def safetensors_dir(path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    """export_source's HF checkpoint, written once (in a fresh process) for the CLI tests of this module."""
    source = tmp_path_factory.mktemp("convert_source") / "hf"
    script = f"from tests.keye_train.convert.test_convert import export_source\nexport_source({str(source)!r})\n"
    made = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    return source


@pytest.fixture(scope="module")
def imported_under(hf_source, tmp_path_factory):
    """layout override -> (the CLI's output, the run dir) of `convert import` of hf_source under that layout; each
    layout imported once per module, the run dirs only read afterwards."""
    from tests.helpers import keye_train

    runs = {}

    def imported(layout: str):
        if layout not in runs:
            run = tmp_path_factory.mktemp("imported") / "run"
            done = keye_train("convert", "import", "--src", str(hf_source), "--dst", str(run), *CLI_COMMON, layout)
            runs[layout] = done, run
        return runs[layout]

    return imported


def export_under(run, back, layout: str) -> dict:
    from tests.helpers import keye_train

    done = keye_train(
        "convert", "export", "--src", str(run), "--dst", str(back), "--dtype", "fp32", *CLI_COMMON, layout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return safetensors_dir(back)


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.ep=2"])
def test_the_cli_imports_and_exports_sharded_layouts_exactly(hf_source, imported_under, layout, tmp_path):
    """An HF checkpoint imported under TP=2 or EP=2 (each rank reading its own slices) and exported again (the
    shards gathered) comes back tensor for tensor."""
    done, run = imported_under(layout)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "combined sha256" in done.stdout and "checkpoint.init_from=" in done.stdout
    assert (run / "checkpoints" / "step_00000000" / "meta.json").is_file()
    a, b = safetensors_dir(hf_source), export_under(run, tmp_path / "back", layout)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_weights_written_under_one_layout_load_into_another_exactly(hf_source, imported_under, tmp_path):
    """checkpoint.init_from across layouts: a TP=2 checkpoint (each rank holding half of every TP-split tensor;
    the same import the TP=2 round trip above exports) exported under EP=2 and under PP=2 (each rank rebuilding
    its own shards from the TP slices through the shard index) gives back the source HF checkpoint tensor for
    tensor."""
    done, run = imported_under("parallel.tp=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "checkpoints" / "step_00000000" / "rank_00001.shards.json").is_file()
    a = safetensors_dir(hf_source)
    for layout in ("parallel.ep=2", "parallel.pp=2"):
        b = export_under(run, tmp_path / layout.replace("=", ""), layout)
        assert a.keys() == b.keys(), layout
        assert all(torch.equal(a[k], b[k]) for k in a), layout


def export_source(path):
    """A tiny Keye-VL-2.0 HF checkpoint (fp32) with a packing table, from our own seeded model."""
    from keye_train.config import ParallelConfig
    from keye_train.convert.exporter import export_keye_hf
    from keye_train.convert.hf_names import PACKING_TABLE
    from parallel import cpu_compat
    from parallel.layout import check_layout, init_process_groups

    cpu_compat.install_if_needed()
    model = tiny()
    model.lm.dsa = dataclasses.replace(model.lm.dsa, mode="sparse")
    init_process_groups(ParallelConfig(), check_layout(ParallelConfig(), model.lm, model.vit, 1), "gloo")
    parts = build(model, seed=8)
    export_keye_hf(
        parts, model, path, passthrough={PACKING_TABLE: torch.randn(32, model.vit.hidden_size)}, dtype=torch.float32
    )


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.ep=2"]])
def test_checkpoints_imported_under_tp2_or_ep2_give_the_same_outputs_and_gradients(layout, tmp_path):
    """TP=2 (DP 1, sequence parallel) or EP=2 (DP 2): each rank imports only its shards; logits, ViT features and
    every gradient (after megatron DDP's reduction, gathered whole) match transformers. The ViT is replicated in
    the colocated placement, so it runs unsharded on each rank."""
    import numpy as np
    from safetensors.torch import load_file

    from tests.helpers import cli_env
    from tests.keye_train.convert.parity_inputs import feature_weights, fixed_inputs

    model = tiny()
    lm_hf, vit_hf = tiny_qwen3_moe(model), tiny_siglip(model)
    lm_hf.save_pretrained(tmp_path / "lm")
    vit_hf.save_pretrained(tmp_path / "vit")
    worker = REPO / "tests" / "keye_train" / "convert" / "convert_worker.py"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(worker),
        str(tmp_path / "lm"),
        str(tmp_path / "vit"),
        str(tmp_path),
        "~recipe",
        "model=tiny",
        "parallel.nproc=2",
        "model.lm.moe_aux_loss_coeff=0",
        *layout,
    ]
    done = subprocess.run(cmd, env=dict(cli_env(), PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    ids, target, image = fixed_inputs(model)
    logits = torch.from_numpy(np.load(tmp_path / "logits.npy", allow_pickle=False))
    features = torch.from_numpy(np.load(tmp_path / "features.npy", allow_pickle=False))
    grads = load_file(tmp_path / "grads.safetensors")
    check_close(f"{layout[0]}: logits", logits, lm_reference(lm_hf, ids, target))
    check_close(f"{layout[0]}: ViT features", features, vit_reference(vit_hf, image, feature_weights(features.shape)))
    check_lm_grads(f"{layout[0]}:", lm_hf, grads)
    check_vit_grads(f"{layout[0]}:", vit_hf, grads)


def test_an_import_plan_splits_the_reads_by_stage_and_expert_rank_without_loading(single_rank, tmp_path):
    from safetensors import safe_open

    from keye_train.convert.exporter import export_keye_hf
    from keye_train.convert.hf_names import PACKING_TABLE
    from tests.helpers import keye_train

    model = tiny()
    model.lm.dsa = dataclasses.replace(model.lm.dsa, mode="sparse")
    table = {PACKING_TABLE: torch.randn(32, model.vit.hidden_size)}
    export_keye_hf(build(model, seed=9), model, tmp_path, passthrough=table, dtype=torch.float32)
    done = keye_train(
        "convert",
        "plan",
        "--src",
        str(tmp_path),
        "~recipe",
        "model=tiny",
        "attention=sparse",
        "parallel.nproc=8",
        "parallel.tp=2",
        "parallel.pp=2",
        "parallel.ep=2",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"unused in the checkpoint (1): {PACKING_TABLE}" in done.stdout
    rows = {}
    for line in done.stdout.splitlines():
        fields = line.split()
        if len(fields) == 5 and fields[0].isdigit():
            rows[(int(fields[0]), int(fields[1]))] = int(fields[3])
    assert sorted(rows) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    with safe_open(tmp_path / "model-00001-of-00001.safetensors", framework="pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    nbytes = {k: 4 * int(torch.tensor(shape).prod()) for k, shape in sizes.items()}
    experts = sum(v for k, v in nbytes.items() if ".mlp.experts." in k)
    rest = sum(nbytes.values()) - experts - nbytes[PACKING_TABLE]
    for stage in (0, 1):  # each EP rank reads its half of the stage's experts
        assert rows[(stage, 0)] == rows[(stage, 1)]
    # every non-expert tensor once over the two stages, every expert once over all four roles
    assert rows[(0, 0)] + rows[(1, 0)] + experts // 2 == rest + experts
