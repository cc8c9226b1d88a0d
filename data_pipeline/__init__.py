"""Bytes to packed samples: shards, decoding, tokenization, packing."""
