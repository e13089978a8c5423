"""The build: the engine that runs passes, the stage cache, records and summaries."""
