# Multi-stage build of the llmgw binary.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY migrations ./migrations
RUN cargo build --release --locked --bin llmgw \
 && cp target/release/llmgw /usr/local/bin/llmgw

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/llmgw --create-home llmgw
COPY --from=build /usr/local/bin/llmgw /usr/local/bin/llmgw
USER llmgw
WORKDIR /var/lib/llmgw
ENV LLMGW_GATEWAY_ADDR=0.0.0.0:8080 \
    LLMGW_API_ADDR=0.0.0.0:8081 \
    LLMGW_LOG_FORMAT=json
EXPOSE 8080 8081
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/readyz || exit 1
ENTRYPOINT ["/usr/local/bin/llmgw"]
CMD ["serve"]
