"""Run artifacts: backends, artifact selection, the cloning pipeline."""
