"""voxport: optimize, export and serve SV2TTS voice-cloning stacks with measured parity."""

__version__ = "0.1.0"
