"""Judging artifacts: real-speech corpus, audio metrics, parity and listener gates, timing."""
