# tidelog node image: `docker build -t tidelog .` (deploy/README.md).
# Stage 1 builds a virtual environment with tidelog and its dependencies (wheels only, no
# compiler in the final image); stage 2 copies it onto a slim Python with a non-root user.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/tidelog
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tidelog ./tidelog
COPY node ./node
COPY controller ./controller
COPY client ./client
RUN /opt/tidelog/bin/pip install ".[node]"

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="tidelog" \
      org.opencontainers.image.description="A replicated log broker (Kafka family) over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 tidelog \
 && useradd --system --uid 10001 --gid tidelog --home-dir /var/lib/tidelog --no-create-home \
      --shell /usr/sbin/nologin tidelog \
 && mkdir -p /var/lib/tidelog \
 && chown tidelog:tidelog /var/lib/tidelog
COPY --from=build /opt/tidelog /opt/tidelog
# Every node setting is also a TIDELOG_NODE_* variable (docs/configuration.md); these are the
# image's defaults: the client port 9092, the internal (node-to-node) port 9093, metrics 9644.
ENV PATH=/opt/tidelog/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TIDELOG_NODE_DATA_DIR=/var/lib/tidelog \
    TIDELOG_NODE_LISTEN=0.0.0.0:9092 \
    TIDELOG_NODE_INTERNAL_LISTEN=0.0.0.0:9093 \
    TIDELOG_NODE_METRICS_PORT=9644
USER 10001:10001
WORKDIR /var/lib/tidelog
VOLUME ["/var/lib/tidelog"]
EXPOSE 9092 9093 9644
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-m", "tidelog.ops.grpc_health", "127.0.0.1:9092"]
ENTRYPOINT ["tidelog"]
CMD ["node", "start"]
