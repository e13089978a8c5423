"""Pruning: unstructured L1 magnitude (compression experiment) and structured channel pruning of
the vocoder (a smaller dense model with real FLOP and time savings), each gated on quality."""
