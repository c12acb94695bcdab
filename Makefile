# Each target runs against DATABASE_URL if set, otherwise against a throwaway
# PostgreSQL that scripts/with-postgres starts and removes.
.PHONY: demo test bench gobench drills build fuzz

demo:
	scripts/demo

# Packages run one at a time (-p 1): the durability tests take every core
# with busy loops on purpose, and the simulator package's test measures
# answer times against the sender's 1 s timeout, so running them at once
# would measure one test's load with the other's clock.
test:
	scripts/with-postgres go test -race -count=1 -p 1 ./...

# The load benchmark: duplicate-heavy and unique-id steps, then each kind
# at twice its highest rate that held, then the edge cases: a flaky object
# service (25% 500s), a dead one (every answer 500 for 60 s, then healthy)
# and a sender that retries (docs/PERFORMANCE.md). BENCH_FLAGS adds flags,
# e.g. BENCH_FLAGS='-edges=false' or a quick check:
# BENCH_FLAGS='-unique-rates 10 -dup-rates 200 -duration 6s -ref-duration 5s -dead-for 10s'.
bench: build
	scripts/with-postgres bin/sim -mode bench -service bin/objtrack $(BENCH_FLAGS)

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

fuzz:
	go test -run '^$$' -fuzz FuzzDecodeCallback -fuzztime 60s .
