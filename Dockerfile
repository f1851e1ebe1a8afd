# syntax=docker/dockerfile:1
#
# One image for the long-running pieces:
#   relay        the relay service (ECS Fargate in AWS: template.yaml runs `relay`)
#   chat-local   the local stack (`serve`), migrations (`migrate`), tokens (`token`)
# docker-compose.local.yml runs its gateways, migration step and relay from it.
#
#   docker build -t chat-backend .                                  # for this machine
#   docker buildx build --platform linux/arm64 -t chat-backend .    # for RelayCpuArchitecture=ARM64
#
# The Lambda functions are not in it: sam build compiles them (cargo lambda).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the build between image builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p chat-local -p chat-relay \
    && mkdir -p /out \
    && cp target/release/chat-local target/release/relay /out/

FROM debian:bookworm-slim
# ca-certificates: TLS to ElastiCache (rediss://), to the Management API, and to
# PostgreSQL with sslrootcert=system (without sslrootcert, verify-full trusts roots
# built into the binary).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
# Migrations are compiled into chat-local; nothing else is read from disk.
USER 10001:10001
EXPOSE 3000
# The relay's health (its loopback endpoint, RELAY_HEALTH_LISTEN): 0 while it
# reaches Redis. The gateways of docker-compose.local.yml set their own check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["relay", "health"]
CMD ["relay"]
