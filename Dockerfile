# syntax=docker/dockerfile:1
# holorec: the online inference service, CPU only.
#
#   docker build -t holorec .                                       # no checkpoint inside
#   docker build -t holorec --build-arg CHECKPOINT=demo/checkpoint .  # bake one (a path in the build context)
#
# Which checkpoint the container serves (see the entrypoint at the end):
#   1. one mounted at /checkpoint (holding checkpoint.json) wins;
#   2. else the one baked in at build time;
#   3. else a small demo is trained on synthetic data at first start, into /checkpoint, and kept there.
# Needs BuildKit (the default builder of Docker 23+ and of `docker compose`).

# ---- build: a virtualenv with CPU-only torch and holorec installed --------------------------------
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# A C compiler for model/native.c (the serving step and top-k in C, built by `pip install`); the runtime image needs none.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
# torch first, from the PyTorch CPU index, so no resolver ever pulls a multi-GB CUDA build.
# Keep the version equal to pyproject.toml's pin (tests/test_dockerfile.py checks).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# Then the other dependencies, from PyPI, in their own layer: a code change does not reinstall them.
COPY pyproject.toml /src/
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY cli.py /src/
COPY model /src/model
COPY service /src/service
COPY bench /src/bench
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps /src \
 && python -c "import torch; assert not torch.version.cuda, 'a CUDA torch got in'; print('torch', torch.__version__)" \
 && cd / && python -c "from model.native import library; assert library(), 'model/native.c was not built'"

# ---- checkpoint: the baked-in checkpoint, or nothing ----------------------------------------------
FROM python:3.11-slim AS checkpoint
ARG CHECKPOINT=
RUN --mount=type=bind,target=/context \
    mkdir -p /baked \
 && if [ -n "$CHECKPOINT" ]; then \
      if [ ! -f "/context/$CHECKPOINT/checkpoint.json" ]; then \
        echo "CHECKPOINT=$CHECKPOINT: no checkpoint.json there (give a directory relative to the build context, not ignored by .dockerignore)" >&2; \
        exit 1; \
      fi; \
      cp -R "/context/$CHECKPOINT/." /baked/; \
    fi

# ---- runtime ---------------------------------------------------------------------------------------
FROM python:3.11-slim AS runtime
LABEL org.opencontainers.image.title="holorec" \
      org.opencontainers.image.description="Online sequential recommendation: per-user recurrent state in Redis, O(1) per event"
RUN groupadd --system --gid 10001 holorec \
 && useradd --system --uid 10001 --gid holorec --home-dir /home/holorec --create-home --shell /usr/sbin/nologin holorec \
 && mkdir -p /checkpoint /tmp/holorec-metrics \
 && chown holorec:holorec /checkpoint /tmp/holorec-metrics
COPY --from=build /opt/venv /opt/venv
COPY --from=checkpoint --chown=holorec:holorec /baked /opt/holorec/checkpoint

# The service's settings are HOLOREC_* variables (service/settings.py); these are the image's defaults.
# HOLOREC_REDIS_URL unset means an in-process store: set it (docker-compose.yml does) for anything real.
# HOLOREC_API_KEY, HOLOREC_STATE_TTL_S are left unset (no key required, states never expire).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOLOREC_CHECKPOINT=/checkpoint \
    HOLOREC_NAMESPACE=default \
    HOLOREC_WORKERS=1 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/holorec-metrics

COPY --chmod=755 <<'EOF' /usr/local/bin/holorec-entrypoint
#!/bin/sh
# Pick the checkpoint, then serve it. With arguments, run them instead (e.g. `holorec evaluate ...`).
set -eu
if [ "$#" -gt 0 ]; then exec "$@"; fi

# Each uvicorn worker writes its metrics here; /metrics sums them. Stale files from a previous run would be
# added in too, so start empty.
metrics_dir="${PROMETHEUS_MULTIPROC_DIR:?}"
mkdir -p "$metrics_dir"
find "$metrics_dir" -mindepth 1 -delete

ckpt="${HOLOREC_CHECKPOINT:-/checkpoint}"
baked=/opt/holorec/checkpoint
# A checkpoint in $ckpt wins, except a demo we trained there earlier when the image now has one baked in.
if [ -f "$ckpt/checkpoint.json" ] && { [ ! -f "$ckpt/.holorec-demo" ] || [ ! -f "$baked/checkpoint.json" ]; }; then
  echo "holorec: serving the checkpoint in $ckpt"
elif [ -f "$baked/checkpoint.json" ]; then
  echo "holorec: serving the checkpoint baked into the image ($baked)"
  ckpt="$baked"
else
  echo "holorec: no checkpoint in $ckpt and none baked in: training a small demo on synthetic data (first start only)"
  staging="$ckpt/.demo-training"
  rm -rf "$staging"
  holorec train --data synthetic --model holomamba --epochs 3 --out "$staging"
  touch "$ckpt/.holorec-demo"
  # checkpoint.json last: it is what marks the directory as a complete checkpoint.
  for f in "$staging"/*; do [ "${f##*/}" = checkpoint.json ] || mv "$f" "$ckpt/"; done
  mv "$staging/checkpoint.json" "$ckpt/"
  rmdir "$staging"
fi

exec holorec serve --checkpoint "$ckpt" --host 0.0.0.0 --port 8000 --workers "${HOLOREC_WORKERS:-1}"
EOF

USER holorec
WORKDIR /home/holorec
EXPOSE 8000
# Liveness only (the process answers); readiness, model loaded and store reachable, is GET /readyz.
# The start period covers a first start that trains the demo checkpoint (about 15 s on a quiet 2-core CPU,
# about a minute on a busy one);
# a check that passes earlier marks the container healthy at once.
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=2)"]
ENTRYPOINT ["holorec-entrypoint"]
