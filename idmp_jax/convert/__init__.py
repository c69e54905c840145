"""PyTorch-format weights <-> Flax param trees (see torch_format)."""
