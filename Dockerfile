# syntax=docker/dockerfile:1
# The zhibo image: one binary, every role (`zhibo gateway|logic-worker|user-api|migrate|dev`).
#
#   docker build -t zhibo:0.1.0 .
#   docker run --rm zhibo:0.1.0 --help
#   # Listening beyond loopback, `zhibo dev` needs a real secret (it refuses its public default there).
#   docker run --rm -p 7000-7002:7000-7002 -p 7003:7003/udp -e ZHIBO_TOKEN_SECRET="$(openssl rand -hex 32)" \
#     -e ZHIBO_API_ADDR=0.0.0.0:7000 -e ZHIBO_GATEWAY__TCP_ADDR=0.0.0.0:7001 \
#     -e ZHIBO_GATEWAY__WS_ADDR=0.0.0.0:7002 -e ZHIBO_GATEWAY__QUIC_ADDR=0.0.0.0:7003 zhibo:0.1.0 dev
#
# The Helm chart in charts/zhibo runs this image (image.repository / image.tag).

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the crates.io downloads and the target directory between builds (BuildKit). The
# binary is copied out of the cached target directory, which the next stage cannot see.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release -p zhibo --locked \
 && install -D -m 0755 target/release/zhibo /out/zhibo

FROM debian:${DEBIAN_RELEASE}-slim
# ca-certificates: for TLS connections to NATS, Redis or ScyllaDB that use public CAs.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 zhibo \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/zhibo --create-home \
      --shell /usr/sbin/nologin zhibo
COPY --from=builder /out/zhibo /usr/local/bin/zhibo
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# `zhibo dev` keeps its embedded store under ./zhibo-data.
WORKDIR /var/lib/zhibo
# user-api, gateway TCP, WebSocket, QUIC, metrics/health.
EXPOSE 7000 7001 7002 7003/udp 9100
ENTRYPOINT ["zhibo"]
CMD ["--help"]
