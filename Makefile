# cdp — build, test, demo, bench. `make demo` and `make test` are the quick start.
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all build release deps test lint demo bench soak clean install install-files

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

# Installs the binaries, the systemd units, the example configurations, the man pages and
# the shell completions under $(DESTDIR)$(PREFIX) (packagers set DESTDIR; the units' ExecStart
# points at $(PREFIX)/bin). The man pages and completions come from the binaries themselves.
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
UNITDIR ?= $(PREFIX)/lib/systemd/system
MANDIR ?= $(PREFIX)/share/man
DOCDIR ?= $(PREFIX)/share/doc/cdp
GENERATED := target/generated
install: release install-files

# What `install` copies, from binaries already built (the packaging test runs it).
install-files:
	rm -rf $(GENERATED)
	target/release/cdp-agent generate --out $(GENERATED)
	target/release/cdp-replica generate --out $(GENERATED)
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(MANDIR)/man1 \
		$(DESTDIR)$(DOCDIR)/examples \
		$(DESTDIR)$(PREFIX)/share/bash-completion/completions \
		$(DESTDIR)$(PREFIX)/share/zsh/vendor-completions \
		$(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d
	install -m 0755 target/release/cdp-agent target/release/cdp-replica $(DESTDIR)$(BINDIR)/
	for u in cdp-agent cdp-replica; do \
		sed 's#^ExecStart=/usr/bin/#ExecStart=$(BINDIR)/#' packaging/systemd/$$u.service \
			> $(DESTDIR)$(UNITDIR)/$$u.service && chmod 0644 $(DESTDIR)$(UNITDIR)/$$u.service; \
	done
	install -m 0644 packaging/examples/agent.toml packaging/examples/replica.toml \
		$(DESTDIR)$(DOCDIR)/examples/
	install -m 0644 $(GENERATED)/man/man1/*.1 $(DESTDIR)$(MANDIR)/man1/
	for b in cdp-agent cdp-replica; do \
		install -m 0644 $(GENERATED)/completions/$$b.bash \
			$(DESTDIR)$(PREFIX)/share/bash-completion/completions/$$b && \
		install -m 0644 $(GENERATED)/completions/_$$b $(DESTDIR)$(PREFIX)/share/zsh/vendor-completions/ && \
		install -m 0644 $(GENERATED)/completions/$$b.fish \
			$(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/; \
	done

clean:
	$(CARGO) clean
