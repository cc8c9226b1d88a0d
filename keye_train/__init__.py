"""keye-train: megatron-core based training for Keye-VL-2.0 style long-video MoE VLMs."""

__version__ = "0.1.0"
