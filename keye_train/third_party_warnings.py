"""Known, harmless warnings from megatron-core 0.16.1 and torch that every rank would print on every run,
burying the progress bars. Each filter names one message exactly; our own warnings, and any other of theirs,
still show."""

from __future__ import annotations

import warnings

KNOWN = (
    # megatron-core calls torch.distributed's renamed collectives (torch >= 2.11 deprecates the old names)
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
    # Transformer Engine and apex are optional here: megatron's fallbacks are the ones we use on purpose
    (UserWarning, r"Transformer Engine and Apex are not installed\. Falling back to"),
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm"),
    # megatron's own TransformerConfig default triggers its deprecation notice (we use no CUDA graphs)
    (UserWarning, r"full scope is deprecated\. Use empty cuda_graph_scope"),
)


def silence_known_warnings() -> None:
    for category, message in KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category)
