# voxport serve on CPU. Build: docker build -t voxport .   Run: see README "Running it in a container".
# The install steps are the README's "Start here" line (tests/test_serve_ops.py checks they agree).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

RUN apt-get update && apt-get install -y --no-install-recommends espeak-ng && rm -rf /var/lib/apt/lists/*

COPY . /app
RUN python3 -m venv .venv && .venv/bin/pip install -e .

# The default bundle, built once at image build time (mount another at /app/artifacts/default instead).
# `voxport build` fetches its corpus with apt-get download, so it needs the package lists again here.
RUN apt-get update && .venv/bin/voxport build hydra.run.dir=/tmp/voxport-build \
    && rm -rf /var/lib/apt/lists/* /tmp/voxport-build

# Not root: the service only writes the voice library (a volume) and Hydra's run directory (/tmp).
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin voxport \
    && mkdir -p /app/artifacts/voice_library && chown -R voxport:voxport /app/artifacts/voice_library
USER voxport
VOLUME ["/app/artifacts/voice_library"]

EXPOSE 8000
# /ready is open without an API key and answers 503 while starting or draining.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/app/.venv/bin/python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4).status != 200)"]

# SIGTERM drains: no new work, admitted work finishes within serve.request_timeout_s (120 s by default),
# so stop with `docker stop -t 130` (Docker's default is 10 s, then SIGKILL).
STOPSIGNAL SIGTERM
# A public bind: the service refuses to start without API keys (VOXPORT_API_KEYS at `docker run`).
ENTRYPOINT ["/app/.venv/bin/voxport", "serve", "serve.host=0.0.0.0", "serve.port=8000", "hydra.run.dir=/tmp/voxport-serve"]
CMD []
