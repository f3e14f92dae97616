# syntax=docker/dockerfile:1
# Hubbub in a container: a multi-stage build, a small non-root final image.
#   docker build -t hubbub .
#   docker run -p 8080:8080 -v hubbub-data:/data hubbub
# No Docker engine runs on our build machines: tests/deploy_files.rs checks what can
# be checked here (every COPY source exists, the build command is this one, and the
# binary built by it starts with this image's environment and passes the health check).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
COPY web web
RUN cargo build --release --locked && strip target/release/hubbub

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin hubbub \
    && mkdir -p /data && chown hubbub:hubbub /data
COPY --from=build /src/target/release/hubbub /usr/local/bin/hubbub
USER hubbub:hubbub
ENV HUBBUB_LISTEN=0.0.0.0:8080 \
    HUBBUB_DATA_DIR=/data \
    HUBBUB_LOG_FORMAT=json
EXPOSE 8080
VOLUME ["/data"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["hubbub", "health", "--url", "http://127.0.0.1:8080/healthz"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["hubbub"]
CMD ["serve"]
