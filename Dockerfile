# The one `polaris` binary (control plane, controller, injector, CA, agent, bootstrap) in a
# non-root image. Built by the kind e2e; the CI machines have no Docker, so it is not built there.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin polaris \
    && strip target/release/polaris

# glibc and libgcc only (TLS is rustls with ring; the allocator is linked in).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/polaris /usr/local/bin/polaris
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/polaris"]
CMD ["server", "--data-dir", "/var/lib/polaris"]
