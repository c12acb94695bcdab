# demo, test, bench and gobench run against DATABASE_URL if set, otherwise
# against a throwaway PostgreSQL that scripts/with-postgres starts and
# removes. bench empties its tables, so it refuses a DATABASE_URL that is not
# that throwaway unless OBJTRACK_BENCH_MAY_TRUNCATE=1. drills need the
# throwaway one (they stop and restart it): run them with DATABASE_URL unset.
# image-test always starts its own.
.PHONY: demo test bench gobench drills build fuzz image-test

demo:
	scripts/demo

# Packages run one at a time (-p 1): the durability tests take every core
# with busy loops on purpose, and the simulator package's test measures
# answer times against the sender's 1 s timeout, so running them at once
# would measure one test's load with the other's clock.
test:
	scripts/with-postgres go test -race -count=1 -p 1 ./...

# The load benchmark: duplicate-heavy and unique-id steps, then each kind
# at twice its highest rate that held, the closed-loop duplicate-heavy row
# against a decode-and-202 server, then the edge cases: a flaky object
# service (25% 500s), a dead one (every answer 500 for 60 s, then healthy)
# and a sender that retries (docs/PERFORMANCE.md); then the spill journal's
# own rate. BENCH_FLAGS adds flags,
# e.g. BENCH_FLAGS='-edges=false' or a quick check:
# BENCH_FLAGS='-unique-rates 10 -dup-rates 200 -duration 6s -ref-duration 5s -dead-for 10s',
# or only the closed-loop row: BENCH_FLAGS='-closed-loop-only -duration 10s'.
bench: build
	scripts/with-postgres bin/sim -mode bench -service bin/objtrack $(BENCH_FLAGS)
	@echo "the spill alone (fsyncs on this disk, group commit, 64 appenders):"
	go test -run '^$$' -bench '^BenchmarkSpillAppend$$' -benchtime 3s .

# Go benchmarks of the decoder, the handler, the fetch path and the upsert
# path; compare runs with benchstat.
gobench:
	scripts/with-postgres go test -run '^$$' -bench . -benchmem -count 6 .

# Failure drills: SIGKILL and restart, PostgreSQL outage, cold start without
# PostgreSQL, object-service faults, a kill under CPU pressure, a flood of
# idle connections, a fleet of three with one killed and restarted, and one
# with an instance lost for good at 80% of DRILLS_CAPACITY (one instance's
# unique capacity in callbacks/s of 200 ids, from make bench; default 20).
# The services get the DSN from DATABASE_URL in the environment.
drills:
	scripts/with-postgres scripts/drills --capacity $(or $(DRILLS_CAPACITY),20) $(DRILLS)

build:
	go build -o bin/objtrack . && go build -o bin/sim ./sim

# The fuzzer keeps what it finds in Go's cache; copying it into testdata
# makes those inputs seeds that every make test runs (commit the new ones).
fuzz:
	go test -run '^$$' -fuzz FuzzDecodeCallback -fuzztime 60s .
	mkdir -p testdata/fuzz/FuzzDecodeCallback
	for f in "$$(go env GOCACHE)"/fuzz/objtrack/FuzzDecodeCallback/*; do \
		[ -f "$$f" ] && cp -n "$$f" testdata/fuzz/FuzzDecodeCallback/; \
	done; true

# The container image built with podman (and runc) and run against a
# throwaway PostgreSQL: readiness, callbacks reaching the table, the health
# checks inside, a clean stop, the build info; then docker-compose.yaml read
# and checked (3-7 minutes; root; installs podman, runc, busybox-static, python3-yaml).
image-test:
	scripts/image-test
