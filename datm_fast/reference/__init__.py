"""Pure-PyTorch references: the ground truth every fast path is tested and benchmarked against."""
