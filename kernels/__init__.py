"""Attention kernels: torch references here, Triton implementations beside them."""
