"""The decoder: transformer, attention kernels, MoE feed-forward and their layers."""
