"""Hugging Face interop: canonical <-> HF names (hf_names.py), streaming import (importer.py), export of any
layout (exporter.py), and the lazy checkpoint reader they share (hf_checkpoint.py)."""
