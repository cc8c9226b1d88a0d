"""Native-resolution SigLIP ViT and the 2x2 patch-merge projector (the vision tower).

The ViT's transformer layers are megatron-core modules with their own TransformerConfig and process groups,
so the tower can be sharded independently of the LM. Every image and video frame is one attention segment:
patches attend only within their own frame.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from data_pipeline.batch import VisualInput
from keye_train.config import ModelConfig, ViTConfig
from keye_train.model.attention import KeyePackedSeqParams
from keye_train.model.megatron_compat import allow_missing_transformer_engine, install_fused_rope
from keye_train.model.positions import vit_rope_angles
from keye_train.model.specs import recompute_options, vit_block_spec


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def vit_transformer_config(
    vit: ViTConfig, dtype: torch.dtype, on_gpu: bool, recompute: str = "none", recompute_modules=(), fused=False
) -> TransformerConfig:
    """`fused` (model.fusion): our Triton RoPE, megatron's bias+tanh-GELU and bias+residual under torch.compile."""
    if fused:
        install_fused_rope()
    return TransformerConfig(
        num_layers=vit.num_layers,
        hidden_size=vit.hidden_size,
        num_attention_heads=vit.num_heads,
        kv_channels=vit.hidden_size // vit.num_heads,
        ffn_hidden_size=vit.ffn_hidden_size,
        normalization="LayerNorm",
        layernorm_epsilon=vit.norm_eps,
        gated_linear_unit=False,
        activation_func=F.gelu if fused else gelu_tanh,  # megatron's fused bias_gelu is the tanh form
        add_bias_linear=True,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=False,
        bias_activation_fusion=fused,
        bias_dropout_fusion=fused,
        apply_rope_fusion=fused,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        **recompute_options(recompute, recompute_modules, vit=True),
    )


def interpolate_pos_table(table: torch.Tensor, grid: int, rows: int, cols: int) -> torch.Tensor:
    """Bilinearly resample the learned grid x grid table to rows x cols; returns [rows * cols, D]."""
    square = table.view(grid, grid, -1).permute(2, 0, 1).unsqueeze(0).float()
    resized = F.interpolate(square, size=(rows, cols), mode="bilinear", align_corners=False)
    return resized.squeeze(0).permute(1, 2, 0).reshape(rows * cols, -1).to(table.dtype)


def position_embeddings(table: torch.Tensor, grid: int, grids: list) -> torch.Tensor:
    """[sum rows * cols, D]: the table resampled to each frame's grid, once per distinct grid (a video's frames
    share one)."""
    resized = {}
    for rows, cols in grids:
        if (rows, cols) not in resized:
            resized[rows, cols] = interpolate_pos_table(table, grid, rows, cols)
    return torch.cat([resized[rows, cols] for rows, cols in grids])


def merge_2x2(features: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """Concatenate each 2x2 block of patches: (2i,2j),(2i,2j+1),(2i+1,2j),(2i+1,2j+1); raster over (i, j)."""
    out, start = [], 0
    for rows, cols in grids.tolist():
        frame = features[start : start + rows * cols].view(rows // 2, 2, cols // 2, 2, -1)
        out.append(frame.permute(0, 2, 1, 3, 4).reshape((rows // 2) * (cols // 2), -1))
        start += rows * cols
    return torch.cat(out, dim=0)


class VisionEncoder(MegatronModule):
    def __init__(self, vit: ViTConfig, config: TransformerConfig, pg_collection):
        super().__init__(config=config)
        self.vit = vit
        patch_dim = 3 * vit.patch_size * vit.patch_size
        self.patch_weight = torch.nn.Parameter(
            torch.empty(vit.hidden_size, 3, vit.patch_size, vit.patch_size, dtype=config.params_dtype)
        )
        self.patch_bias = torch.nn.Parameter(torch.empty(vit.hidden_size, dtype=config.params_dtype))
        self.pos_table = torch.nn.Parameter(torch.empty(vit.pos_grid**2, vit.hidden_size, dtype=config.params_dtype))
        self.patch_dim = patch_dim
        self.blocks = TransformerBlock(
            config, vit_block_spec(config), post_layer_norm=True, pg_collection=pg_collection
        )

    def forward(self, visual: VisualInput) -> torch.Tensor:
        """[N, patch_dim] patches -> [N, hidden] post-LayerNorm features."""
        x = F.linear(
            visual.patches.to(self.patch_weight.dtype), self.patch_weight.view(-1, self.patch_dim), self.patch_bias
        )
        x = x + position_embeddings(self.pos_table, self.vit.pos_grid, visual.grids.tolist())
        head_dim = self.vit.hidden_size // self.vit.num_heads
        angles = vit_rope_angles(visual.grids, head_dim, self.vit.rope_theta).to(x.device)
        cu = visual.frame_cu_seqlens().to(x.device)
        lengths = visual.grids.prod(dim=1).tolist()  # one host round trip, shared by every layer
        packed = KeyePackedSeqParams(
            qkv_format="sbhd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            max_seqlen_q=max(lengths, default=0),
            max_seqlen_kv=max(lengths, default=0),
            document_lengths=lengths,
        )
        hidden = self.blocks(
            hidden_states=x.unsqueeze(1),
            attention_mask=None,
            rotary_pos_emb=angles[:, None, None, :],
            packed_seq_params=packed,
        )
        return hidden.squeeze(1)


class Projector(MegatronModule):
    """2x2 merge -> LayerNorm(4 d_vit) -> Linear -> GELU -> Linear(d_lm)."""

    def __init__(self, vit_hidden: int, lm_hidden: int, norm_eps: float, config: TransformerConfig):
        super().__init__(config=config)
        merged = 4 * vit_hidden
        dtype = config.params_dtype
        self.norm = torch.nn.LayerNorm(merged, eps=norm_eps, dtype=dtype)
        self.linear_1 = torch.nn.Linear(merged, merged, dtype=dtype)
        self.linear_2 = torch.nn.Linear(merged, lm_hidden, dtype=dtype)

    def forward(self, features: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        merged = merge_2x2(features, grids)
        return self.linear_2(F.gelu(self.linear_1(self.norm(merged))))


class VisionTower(MegatronModule):
    """ViT + projector: pixels of a pack -> LM-width embeddings for its visual pad tokens."""

    def __init__(self, model: ModelConfig, config: TransformerConfig, pg_collection):
        super().__init__(config=config)
        allow_missing_transformer_engine()
        self.tp_group = pg_collection.tp if pg_collection is not None else None  # placement=split: the ViT's TP
        self.encoder = VisionEncoder(model.vit, config, pg_collection)
        self.projector = Projector(model.vit.hidden_size, model.lm.hidden_size, model.projector.norm_eps, config)

    def forward(self, visual: VisualInput) -> torch.Tensor:
        encoder_trains = any(p.requires_grad for p in self.encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and encoder_trains):
            features = self.encoder(visual)  # a frozen ViT keeps no activations
        return self.projector(features, visual.grids)

    def set_input_tensor(self, tensor) -> None:  # the tower is never pipelined
        pass
