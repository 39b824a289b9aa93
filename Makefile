# cdp — build, test, demo, bench. `make demo` and `make test` are the quick start.
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all build release deps test lint demo bench soak clean

all: build

deps:
	@tests/scripts/deps.sh

build:
	$(CARGO) build --workspace --bins --locked

release:
	$(CARGO) build --workspace --bins --release --locked

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

# The whole test suite: formatting and lints, unit and property tests, end-to-end tests with
# real NBD clients (libnbd, qemu-io, nbdcopy, fio). Everything runs optimized, as it ships:
# the end-to-end tests start the release binaries, and the unit and property tests run with
# the release profile too (a miscompile at opt-level 2 once made every release build skip its
# resyncs while the debug suite passed).
test: deps lint release
	$(CARGO) test --workspace --release --locked -- --test-threads=2

# Builds, then runs the main job end to end on loopback in a temporary directory.
demo: deps release
	tests/scripts/demo.sh target/release

# Benchmarks side by side with real peers (fio, nbdkit, qemu-nbd, cp); writes BENCHMARKS.md.
# About 10 minutes on 2 cores by default; BENCH_ARGS='--rounds 5 --runtime 30' for a bigger run.
BENCH_ARGS ?=
bench: deps release
	/usr/bin/python3 tests/bench/bench.py --bin target/release --out BENCHMARKS.md $(BENCH_ARGS)

# Longer runs of the randomized and fault tests (counts raised).
soak: deps release
	CDP_TEST_DEADLINE_S=14400 CDP_VERIFY_SECS=600 CDP_ORACLE_OPS=20000 CDP_REPLICA_KILLS=200 CDP_AGENT_KILLS=200 CDP_UNSPOOLED_KILLS=50 CDP_CRASH_ROUNDS=100 CDP_REPAIR_ROUNDS=100 CDP_OVERFLOW_ROUNDS=100 $(CARGO) test --workspace --release --locked -- --test-threads=1

clean:
	$(CARGO) clean
