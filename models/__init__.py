"""PyTorch definitions of the three networks, their checkpoint loaders and audio front ends."""
