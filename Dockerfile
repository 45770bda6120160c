# The Causeway image: the five binaries (causeway, causeway-store-node, causeway-config-manager,
# causeway-api-server, causeway-cdc) on Debian bookworm-slim, run as the unprivileged user
# causeway (uid/gid 10001). No ENTRYPOINT: each workload names its binary as the command (the
# Helm chart sets `command`); the default command only prints the api-server's usage.
#
# A full build, from source:
#   podman build -t causeway:0.1.0 .        (or: docker build -t causeway:0.1.0 .)
#
# Only the runtime stage, from binaries built elsewhere (scripts/image.sh does this with the
# host's cargo output; CI cannot pull rust:1.95-bookworm): the stage `build` is replaced by a
# directory that holds out/bin/<the five binaries>, so `COPY --from=build` takes them and the
# build stage never runs:
#   podman build --target runtime --build-context build=DIR -t causeway:dev .
# (podman >= 4.3 / buildah >= 1.28, or docker buildx.) The file is the same for both builds.

# ---------------------------------------------------------------------------------------------
FROM docker.io/library/rust:1.95-bookworm AS build

# RocksDB (bindgen: libclang; its C++ build: clang, cmake) and librdkafka (cmake, OpenSSL, zlib).
# protoc comes from the protoc-bin-vendored crate.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      clang libclang-dev cmake pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .

# The cargo registry and the target directory are cache mounts, so the binaries are copied
# out (stripped) in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir -p /out/bin \
 && for b in causeway causeway-store-node causeway-config-manager causeway-api-server causeway-cdc; do \
      cp "target/release/$b" "/out/bin/$b" && strip "/out/bin/$b"; \
    done

# ---------------------------------------------------------------------------------------------
FROM docker.io/library/debian:bookworm-slim AS runtime

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="causeway" \
      org.opencontainers.image.description="Causeway, a distributed document store: store node, config manager, API server, change data capture and the causeway CLI" \
      org.opencontainers.image.source="https://example.invalid/causeway" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"

# What the binaries link besides glibc: libssl3/libcrypto (OpenSSL), zlib, libstdc++ and
# libgcc_s (RocksDB, librdkafka); CA certificates for TLS to Kafka and other endpoints.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates libssl3 zlib1g libstdc++6 libgcc-s1 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
 && groupadd --gid 10001 causeway \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/causeway \
      --shell /usr/sbin/nologin causeway \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/causeway

COPY --from=build /out/bin/ /usr/local/bin/

USER 10001:10001
WORKDIR /var/lib/causeway

# api-server 7300 (HTTP), config manager 7400 (gRPC), cdc 7500 (admin HTTP); the store node
# has no default ports: the chart gives it 7600 (gRPC) and 7601 (admin HTTP).
EXPOSE 7300 7400 7500 7600 7601

CMD ["causeway-api-server", "--help"]
