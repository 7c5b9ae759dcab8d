# nginx supervised by nginx-graceful: `docker build -t nginx-graceful .`
#
# The runtime stage is the official nginx image; another one built like it (nginx on PATH,
# /etc/nginx, /etc/nginx/mime.types, uid 101) can take its place:
#   docker build --build-arg NGINX_IMAGE=nginx:1.28-alpine -t nginx-graceful .
#
# Where no Rust image can be pulled, build the static binary first and take it from the context:
#   scripts/build-static.sh && docker build --build-arg BINARY=prebuilt -t nginx-graceful .
ARG NGINX_IMAGE=nginx:stable
# The stage the binary comes from: `build` (compiled here) or `prebuilt` (scripts/build-static.sh).
ARG BINARY=build

# A static (musl) binary: it needs nothing from the image it runs in, not even a libc.
FROM rust:1-alpine AS build
# The supervisor compiles no C: musl's C runtime files are all the link needs.
RUN apk add --no-cache musl-dev
WORKDIR /src
# Only what the build reads: src embeds the files of nginx-conf (include_str!), and cargo loads
# every member of the workspace, refusing to start when a target one declares has no file. Only
# the supervisor is built (-p): the tools' TLS and HTTP client stay out of the image.
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY nginx-conf nginx-conf
COPY benches benches
COPY tools tools
COPY test-support test-support
RUN cargo build --release --locked -p nginx-graceful \
 && install -D target/release/nginx-graceful /out/nginx-graceful

# The binary scripts/build-static.sh left in the build context (.dockerignore lets this one
# file of target/ in). A builder skips this stage unless BINARY names it.
FROM scratch AS prebuilt
COPY target/x86_64-unknown-linux-musl/release/nginx-graceful /out/nginx-graceful

FROM ${BINARY} AS binary

FROM ${NGINX_IMAGE}
COPY --from=binary /out/nginx-graceful /usr/local/bin/nginx-graceful
# The base image's sites go (its default.conf listens on 80, a privileged port); the
# runtime directory is the only place nginx and the supervisor write: the pid file, temp files,
# the drain flag, the control socket. A read-only root filesystem needs an emptyDir there.
# As root, whatever USER the base sets (nginxinc/nginx-unprivileged sets 101); USER below is
# what runs.
USER root
RUN rm -rf /etc/nginx/conf.d \
 && install -d -o 101 -g 101 -m 755 /run/nginx-graceful
COPY nginx-conf/image/nginx.conf /etc/nginx/nginx.conf
COPY nginx-conf/image/default.conf /etc/nginx/conf.d/default.conf
COPY nginx-conf/graceful-drain.conf /etc/nginx/graceful-drain.conf
# Where nginx.conf's `pid` directive puts the master's pid: `nginx-graceful drain` and `reload`
# read it when no supervisor answers. The runtime directory stays at its default,
# /run/nginx-graceful, the path graceful-drain.conf tests for the drain flag.
ENV NGINX_GRACEFUL_PID_FILE=/run/nginx-graceful/nginx.pid
# The official image's user nginx, by number so that Kubernetes' runAsNonRoot can check it.
USER 101:101
# 8080: nginx (default.conf). 8081: the supervisor's /healthz and /readyz.
EXPOSE 8080 8081
# SIGTERM on purpose, where the official image sets SIGQUIT (nginx's graceful quit, which closes
# the listeners at once): the supervisor turns SIGTERM into the ordered drain (readiness fails,
# keep-alive clients are told to close, the propagation delay) and only then sends nginx
# SIGQUIT. A SIGQUIT to the supervisor would skip the propagation delay.
STOPSIGNAL SIGTERM
# Replaces the official image's /docker-entrypoint.sh: the supervisor is PID 1.
ENTRYPOINT ["nginx-graceful", "run", "--"]
CMD ["nginx", "-g", "daemon off;"]
