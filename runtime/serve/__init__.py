"""The voice-cloning HTTP service (`voxport serve`): FastAPI app, voice library, batching engine."""
