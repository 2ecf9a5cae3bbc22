# dwsproxy container image.
#
#   docker build -t dwsproxy:0.1.0 .
#   docker run --rm -p 6432:6432 -p 9187:9187 -v /srv/dwsproxy:/etc/dwsproxy:ro dwsproxy:0.1.0
#
# The mounted folder holds dwsproxy.toml and the files it names (paths in it are relative to
# its own folder). In a container, [metrics] host must be "0.0.0.0", or neither Prometheus
# nor the kubelet can reach /metrics and /healthz. Reload after changing files:
#   docker kill --signal HUP <container>

FROM python:3.11-slim

# No .pyc writes at run time (the root filesystem may be read-only); logs reach
# `docker logs` as they are written.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what `pip install .` reads, so edits to tests/ or docs do not invalidate this layer.
# Every dependency ships manylinux wheels, so the slim image needs no compiler.
# `dwsproxy probe` reads CONNINFO with libpq's own rules (libpq.so.5 through ctypes): the slim
# image has no libpq of its own. The proxy itself does not need it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpq5 \
 && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md /src/
COPY proxy/ /src/proxy/
RUN pip install /src \
 && rm -rf /src

# A fixed uid so that file ownership on mounted volumes is predictable.
RUN groupadd --system --gid 10001 dwsproxy \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin dwsproxy \
 && mkdir -p /etc/dwsproxy

# Numeric, not the name: Kubernetes' runAsNonRoot can only check a numeric USER without
# reading the image's /etc/passwd. The key must be owned by this uid with mode 0600, or by
# root with mode 0640 at most, as PostgreSQL requires.
USER 10001:10001

# 6432: PostgreSQL clients (SSLRequest or direct TLS). 9187: GET /metrics and /healthz.
EXPOSE 6432 9187

# urllib because slim images have no curl. urlopen raises on any non-2xx answer (and on a
# refused connection), so the uncaught exception gives a non-zero exit status: unhealthy.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9187/healthz', timeout=3)"]

# dwsproxy must handle SIGTERM itself: as PID 1, a signal it has no handler for is ignored and
# `docker stop` would end in SIGKILL. Spelled out so a change of base image cannot change it.
STOPSIGNAL SIGTERM

# Exec form: dwsproxy is PID 1 and receives SIGTERM/SIGHUP itself, with no shell between.
# ENTRYPOINT and CMD are split so `docker run IMAGE check-config /etc/dwsproxy/dwsproxy.toml`
# works.
ENTRYPOINT ["dwsproxy"]
CMD ["--config", "/etc/dwsproxy/dwsproxy.toml"]
