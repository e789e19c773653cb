# syntax=docker/dockerfile:1
# tunnel-agent: one image for the device agent (default) and the relay (override CMD).
#
#   docker build -t tunnel-agent:0.1.0 .
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

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a wheel of the project and wheels of all its runtime dependencies ----
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY tunnel_agent ./tunnel_agent
# Only [project.dependencies] are resolved: no test extras, no build tools reach the final stage.
RUN python -m pip wheel --no-cache-dir --disable-pip-version-check --wheel-dir /wheels .

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

# Install from the build stage's wheels only (--no-index): nothing is fetched here and the wheels
# themselves do not end up in a layer (bind mount). PyAV's wheel bundles the FFmpeg libraries.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/tunnel-agent/.venv \
 && /opt/tunnel-agent/.venv/bin/pip install --no-cache-dir --disable-pip-version-check \
      --no-index --find-links=/wheels /wheels/tunnel_agent-*.whl

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
