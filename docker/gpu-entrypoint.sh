#!/bin/sh
# Build the TensorRT bundle on this GPU (once: the stage cache makes a rebuild quick), then serve it.
# Extra arguments are Hydra overrides for `voxport serve` (e.g. serve.trusted_hosts=[voices.example.com]).
set -eu
cd /app
.venv/bin/voxport build target=tensorrt hydra.run.dir=/tmp/voxport-build
exec .venv/bin/voxport serve target=tensorrt serve.host=0.0.0.0 serve.port=8000 \
    hydra.run.dir=/tmp/voxport-serve "$@"
