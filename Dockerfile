# Multi-stage build: compile in the official Rust image, run on a slim Debian.
#
#   docker build -t readthrough .
#   docker run --rm -p 127.0.0.1:50051:50051 -e DATABASE_URL=... -e REDIS_URL=... \
#     -e AUTH_TOKENS_FILE=/etc/readthrough/tokens -v $PWD/deploy/dev-tokens:/etc/readthrough/tokens:ro readthrough
#
# The listeners face the container's network, so `serve` refuses to start
# without authentication (AUTH_TOKENS_FILE, AUTH_JWT_SECRET or
# AUTH_JWT_PUBLIC_KEY_FILE) unless INSECURE_ALLOW_UNAUTHENTICATED=true.
#
# protoc comes from the protoc-bin-vendored crate, so nothing extra is installed.

# ---- build ----
FROM rust:1.94-bookworm AS builder
WORKDIR /app

COPY Cargo.toml Cargo.lock build.rs ./
# Build flags (tokio's unstable runtime options; see src/app/runtime.rs).
COPY .cargo ./.cargo
# The protos live in the client crate, a workspace member the server's build.rs compiles them from.
COPY client ./client
COPY migrations ./migrations
COPY src ./src
# Cargo.toml declares the bench/ and testkit/ workspace members, so their
# sources must exist for any build.
COPY bench ./bench
COPY testkit ./testkit

RUN cargo build --release --locked --bin readthrough

# ---- runtime ----
FROM debian:bookworm-slim AS runtime

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 readthrough \
    && useradd --system --uid 10001 --gid readthrough --no-create-home \
        --shell /usr/sbin/nologin readthrough

COPY --from=builder /app/target/release/readthrough /usr/local/bin/readthrough

USER 10001:10001

# gRPC (GRPC_ADDR) faces the container's network. Cache administration
# (ADMIN_ADDR) and Prometheus metrics at /metrics (METRICS_ADDR) stay on the
# container's loopback unless told otherwise: ADMIN_ADDR=0.0.0.0:50052 for
# operators (bearer tokens with the admin role), METRICS_ADDR=0.0.0.0:9090
# with METRICS_TOKEN_FILE for Prometheus (as docker-compose.yml does).
ENV GRPC_ADDR=0.0.0.0:50051
EXPOSE 50051 50052 9090

# The gRPC health service, asked by the binary itself (no probe to download).
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["readthrough", "health"]

ENTRYPOINT ["readthrough"]
CMD ["serve"]
