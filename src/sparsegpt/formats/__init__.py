"""How pruned models are stored: atomic writes, plain safetensors files, and the compact format with its
native decoder (specified in docs/FORMAT.md)."""
