# syntax=docker/dockerfile:1
# Build: static binaries, no cgo. GO_IMAGE is the build stage's base: any
# image with Go 1.26 and a shell; make image-test passes a stand-in built
# from the local toolchain, since no image registry is reachable there.
ARG GO_IMAGE=golang:1.26-bookworm
FROM ${GO_IMAGE} AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# .git is not in the build context (.dockerignore), so Go cannot stamp the
# revision: pass it in for -version and objtrack_build_info, e.g.
#   docker build --build-arg VERSION=$(git describe --always) --build-arg REVISION=$(git rev-parse HEAD) .
ARG VERSION=""
ARG REVISION=""
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w -X main.linkedVersion=${VERSION} -X main.linkedRevision=${REVISION}" -o /out/objtrack . \
 && CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/sim ./sim \
 && mkdir -p /out/spill

# The simulator (sender and object service) for the compose demo:
#   docker build --target sim -t objtrack-sim .
FROM scratch AS sim
COPY --from=build /out/sim /sim
USER 65532:65532
EXPOSE 9010
ENTRYPOINT ["/sim"]

# The service: the final, default stage. A scratch image holding the binary
# and CA certificates (for an https upstream), run as a non-root user.
# On SIGTERM it stops taking callbacks, finishes for up to -grace (10 s) and
# parks what is left in the journal (up to 3 s more): give it
# docker run --stop-timeout 15 (the default, 10 s, kills it mid-park).
FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/objtrack /objtrack
# The spill journal (-spill-dir): the service user must own it, and it must
# be a volume of its own per container, so that it survives a restart.
COPY --from=build --chown=65532:65532 /out/spill /var/lib/objtrack/spill
VOLUME /var/lib/objtrack/spill
USER 65532:65532
ENV OBJTRACK_LISTEN=:9090 OBJTRACK_SPILL_DIR=/var/lib/objtrack/spill
EXPOSE 9090
# No shell or curl in the image: the binary checks its own /healthz
# (liveness; a database outage must not restart the container). Compose
# waits on readiness with -healthcheck -healthcheck-path /readyz.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["/objtrack", "-healthcheck"]
ENTRYPOINT ["/objtrack"]
