# tollhouse gateway image. Build from the repository root: docker build -t tollhouse .
# docker-compose.yml builds and runs it; README.md, "Running on the HQ server", explains the setup.
FROM python:3.12-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The gateway runs as this unprivileged user; /data (CA, DuckDB log) and /certs (the CA bundle for
# projects) belong to it, so named volumes mounted there start out writable for it.
RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home tollhouse \
    && mkdir -p /data /certs /etc/tollhouse \
    && chown tollhouse:tollhouse /data /certs

WORKDIR /opt/tollhouse
COPY pyproject.toml README.md ./
COPY addons ./addons
COPY plugins ./plugins
RUN pip install . && rm -rf /opt/tollhouse/build

COPY docker/rules.yaml /etc/tollhouse/rules.yaml

USER tollhouse
WORKDIR /data
VOLUME ["/data"]

# 8080: forward proxy (HTTPS_PROXY). 8787: base-URL listener (OPENAI_BASE_URL=http://HOST:8787/v1).
EXPOSE 8080 8787

# The image has no curl, so Python opens a TCP connection to both listeners. The ports are those of
# docker/rules.yaml; a rules file with other ports needs its own health check.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import socket; [socket.create_connection(('127.0.0.1', port), timeout=3).close() for port in (8080, 8787)]"]

# `docker run IMAGE` runs the gateway; `docker run IMAGE ca --bundle FILE` or `IMAGE check` run
# another tollhouse command with the same rules file.
ENTRYPOINT ["tollhouse"]
CMD ["run", "--rules", "/etc/tollhouse/rules.yaml"]
