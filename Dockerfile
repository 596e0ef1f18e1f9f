# rcptguard: a static binary in a distroless image, running as a non-root user.
#
#   docker build --build-arg VERSION=v0.1.0 --build-arg COMMIT=$(git rev-parse HEAD) -t rcptguard .
#   docker run -d --name rcptguard --network host \
#       -v /var/lib/rcptguard:/var/lib/rcptguard \
#       -v /var/spool/postfix/rcptguard:/var/spool/postfix/rcptguard \
#       -v /etc/rcptguard/rcptguard.toml:/etc/rcptguard/rcptguard.toml:ro rcptguard
#
# Only root, the daemon's own uid and policy.allow_users may send requests.
# The image has no postfix user: in the mounted config, listen on the unix
# socket in the shared directory and set allow_users to the host's numeric
# Postfix uid (see the README, "With Docker"). A published TCP port is not
# recommended: its connections come from the bridge address.

FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=""
ARG COMMIT=""
RUN CGO_ENABLED=0 go build -trimpath \
      -ldflags="-s -w -X github.com/rcptguard/rcptguard/cmd/rcptguard/app.version=${VERSION} -X github.com/rcptguard/rcptguard/cmd/rcptguard/app.commit=${COMMIT}" \
      -o /out/rcptguard ./cmd/rcptguard \
 && /out/rcptguard version \
 && mkdir -p /out/state/spool \
 && sed -e '/^\[policy\]/,/^\[detector\]/ s|^listen = .*|listen = ["127.0.0.1:10040"]|' -e 's|^socket_group = .*|socket_group = ""|' \
      contrib/rcptguard.toml >/out/rcptguard.toml

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/rcptguard /usr/local/bin/rcptguard
COPY --from=build --chown=65532:65532 /out/state /var/lib/rcptguard
# contrib/rcptguard.toml with the built-in TCP listener instead of the host
# install's socket in Postfix's queue directory.
COPY --from=build /out/rcptguard.toml /etc/rcptguard/rcptguard.toml
USER 65532:65532
ENV RCPTGUARD_CONFIG=/etc/rcptguard/rcptguard.toml
VOLUME ["/var/lib/rcptguard"]
# Policy service (policy.listen).
EXPOSE 10040
# Prometheus metrics, when metrics.listen = "0.0.0.0:9410".
EXPOSE 9410
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/rcptguard", "health"]
ENTRYPOINT ["/usr/local/bin/rcptguard"]
CMD ["serve"]
