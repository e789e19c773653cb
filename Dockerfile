# syntax=docker/dockerfile:1
# tunnel-agent: one image for the device agent (default) and the relay (override CMD).
#
#   docker build -t tunnel-agent:0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/tunnel-agent:0.1.0 --push .
#   docker run -d --name tunnel-agent --stop-timeout 45 \
#     -v /etc/tunnel-agent:/etc/tunnel-agent:ro -v /var/lib/tunnel-agent:/var/lib/tunnel-agent \
#     -e TUNNEL_AGENT_HUB__CONNECTION_STRING="$CONN" tunnel-agent:0.1.0
#   docker run -d --name tunnel-relay -p 8443:8443 -e HEALTHCHECK_URL=https://127.0.0.1:8443/healthz \
#     -v /etc/tunnel-relay:/etc/tunnel-agent:ro tunnel-agent:0.1.0 relay --config /etc/tunnel-agent/relay.toml
#
# Secrets (connection strings, keys, API key) are never baked in: pass them as TUNNEL_AGENT_*
# environment variables or in the mounted TOML file / certificate files.
# --stop-timeout 45: on SIGTERM the agent closes tunnels (close_timeout + 1 s), lets pending
# method answers go out (<= 5 s) and disconnects from the hub (<= hub.operation_timeout, 30 s).

# The base image, pinned by the digest of its multi-arch index (one digest serves amd64 and
# arm64): `python3 scripts/pin-base-image.py` asks Docker Hub for it, checks that the index lists
# both platforms and writes it here; run again, it moves the pin to the tag's newest image.
# NOT PINNED YET: until it is, the tag alone is used.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: the venv, from uv.lock only ----
FROM ${PYTHON_IMAGE} AS build
# uv from PyPI, hash-checked (the file lists the wheel of every platform, so this step is the same
# on amd64 and arm64).
COPY scripts/uv-requirements.txt /tmp/uv-requirements.txt
RUN python -m pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
      --no-deps --only-binary=:all: --require-hashes -r /tmp/uv-requirements.txt
ENV UV_PROJECT_ENVIRONMENT=/opt/tunnel-agent/.venv \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy
WORKDIR /src
COPY pyproject.toml uv.lock README.md LICENSE ./
# --locked: exactly the versions and hashes in uv.lock (an error if it no longer matches
# pyproject.toml); no extras, so no test tools and no devhub. Dependencies first, so their layer
# survives changes to the source.
RUN uv sync --locked --no-install-project --no-editable --no-cache --python /usr/local/bin/python3
COPY tunnel_agent ./tunnel_agent
# The project as a wheel (uv's build backend, built in; the wheel leaves out the devhub, the demo
# and the camera simulator).
RUN uv sync --locked --no-editable --no-cache --python /usr/local/bin/python3

# ---- runtime ----
FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="tunnel-agent" \
      org.opencontainers.image.description="Reach RTSP cameras behind a firewall or NAT through Azure IoT Hub: device agent and relay" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"

# Fixed UID/GID so host folders (bind mounts, hostPath, PVCs) can be owned by 10001 ahead of time.
RUN groupadd --system --gid 10001 tunnel-agent \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin tunnel-agent \
 && mkdir -p /etc/tunnel-agent /var/lib/tunnel-agent/media \
 && chown -R 10001:10001 /var/lib/tunnel-agent

# The build stage's venv as it is: same base image, so its interpreter path is the same here.
# Nothing is fetched in this stage; PyAV's wheel bundles the FFmpeg libraries.
COPY --from=build /opt/tunnel-agent/.venv /opt/tunnel-agent/.venv

COPY deploy/docker/healthcheck.py /opt/tunnel-agent/healthcheck.py

ENV PATH="/opt/tunnel-agent/.venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TUNNEL_AGENT_OBSERVABILITY__LISTEN=127.0.0.1:9400 \
    HEALTHCHECK_URL=http://127.0.0.1:9400/healthz
# Observability stays on loopback in the image: the HEALTHCHECK runs inside the container's network
# namespace, so 127.0.0.1 reaches it and /metrics is not exposed by default. Where something
# outside the container probes or scrapes (Kubernetes kubelet, Prometheus), set
# TUNNEL_AGENT_OBSERVABILITY__LISTEN=0.0.0.0:9400 (the Kubernetes manifests do).

USER 10001:10001
WORKDIR /var/lib/tunnel-agent
VOLUME ["/var/lib/tunnel-agent"]
EXPOSE 9400

# /healthz = process alive. The relay image run sets HEALTHCHECK_URL to its own /healthz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "/opt/tunnel-agent/healthcheck.py"]

ENTRYPOINT ["tunnel-agent"]
CMD ["run", "--config", "/etc/tunnel-agent/agent.toml"]
