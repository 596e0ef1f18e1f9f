# rcptguard: static binary in a distroless image, running as a non-root user.
#   docker build -t rcptguard .
#   docker run -v rcptguard-state:/var/lib/rcptguard -v ./rcptguard.toml:/etc/rcptguard/rcptguard.toml:ro \
#              -p 127.0.0.1:10040:10040 rcptguard
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/rcptguard ./cmd/rcptguard \
 && mkdir -p /out/state && /out/rcptguard version

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/rcptguard /usr/local/bin/rcptguard
COPY --from=build --chown=65532:65532 /out/state /var/lib/rcptguard
USER 65532:65532
VOLUME ["/var/lib/rcptguard"]
# Policy service. In a container the config must listen on 0.0.0.0:10040
# (policy.listen) for the port to be reachable; publish it on loopback only.
EXPOSE 10040
# Metrics, when metrics.listen = "0.0.0.0:9410".
EXPOSE 9410
ENV RCPTGUARD_CONFIG=/etc/rcptguard/rcptguard.toml
ENTRYPOINT ["/usr/local/bin/rcptguard"]
CMD ["serve"]
