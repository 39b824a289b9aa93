#!/usr/bin/env bash
# The main job end to end, on loopback, in a temporary directory:
# a sample volume with data in it, a replica and an agent, writes through NBD with real
# clients (qemu-io, nbdcopy), a bookmark, more writes, restores of the bookmark and of
# `latest`, byte-for-byte comparisons, the status tables, and a clean stop of everything.
set -euo pipefail

BIN=$(cd "${1:-target/release}" && pwd)
AGENT="$BIN/cdp-agent"
REPLICA="$BIN/cdp-replica"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cdp-demo.XXXXXX")
PIDS=()

cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ $rc -eq 0 ]; then rm -rf "$WORK"; else echo "demo failed; logs and files are in $WORK" >&2; fi
  exit $rc
}
trap cleanup EXIT INT TERM

step() { printf '\n== %s\n' "$*"; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then echo "timed out waiting for $what" >&2; return 1; fi
    sleep 0.1
  done
}
json() { /usr/bin/python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

PORT=$(/usr/bin/python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
LISTEN="127.0.0.1:$PORT"
R="$WORK/replica"; A="$WORK/agent"; DEV="$WORK/demo.img"; SOCK="$A/nbd.sock"
URI="nbd+unix:///demo?socket=$SOCK"

step "a sample volume: 64 MiB, its first 16 MiB already holding data"
truncate -s 64M "$DEV"
head -c 16M /dev/urandom | dd of="$DEV" conv=notrunc status=none

step "replica and agent: identities, pairing, protection"
RFP=$("$REPLICA" init --data "$R" --listen "$LISTEN" | sed -n 's/^fingerprint: //p')
AFP=$("$AGENT" init --data "$A" --replica "$LISTEN" --replica-fingerprint "$RFP" | sed -n 's/^fingerprint: //p')
"$REPLICA" authorize --data "$R" --agent "$AFP" --name demo-agent
"$AGENT" protect --data "$A" --volume demo --device "$DEV"

step "starting the replica on $LISTEN and the agent on $SOCK"
"$REPLICA" serve --data "$R" >"$WORK/replica.log" 2>&1 & PIDS+=($!)
"$AGENT" run --data "$A" >"$WORK/agent.log" 2>&1 & PIDS+=($!)
wait_for 30 "the agent's NBD socket" nbdinfo "$URI"
nbdinfo --list "nbd+unix://?socket=$SOCK" | grep -E 'export=|export-size' || true

step "writing through NBD with qemu-io (patterns, a discard, a zero-write)"
qemu-io -f raw "$URI" -c 'write -P 0xaa 0 4M' -c 'write -P 0x5c 20M 3M' -c 'discard 40M 2M' -c 'write -z 12M 1M' | grep -v '^ops\|^wrote\|^discard'

step "bookmark before-upgrade (waits until the replica has it)"
"$AGENT" bookmark --data "$A" before-upgrade --wait
nbdcopy "$URI" "$WORK/expected-bookmark.img"

step "writing more: qemu-io patterns and a random 8 MiB image piece through nbdcopy"
qemu-io -f raw "$URI" -c 'write -P 0xcc 2M 4M' -c 'write -P 0xdd 62M 2M' | grep -v '^ops\|^wrote'
head -c 8M /dev/urandom > "$WORK/piece.bin"
qemu-io -f raw "$URI" -c "write -s $WORK/piece.bin 30M 8M" | grep -v '^ops\|^wrote'
"$AGENT" bookmark --data "$A" demo-end --wait
nbdcopy "$URI" "$WORK/expected-latest.img"

step "restoring the bookmark and latest"
"$REPLICA" restore --data "$R" --volume demo --at bookmark:before-upgrade --out "$WORK/restored-bookmark.img"
"$REPLICA" restore --data "$R" --volume demo --at latest --out "$WORK/restored-latest.img"
cmp "$WORK/restored-bookmark.img" "$WORK/expected-bookmark.img"
cmp "$WORK/restored-latest.img" "$WORK/expected-latest.img"
echo "both restores are byte-for-byte identical to what the client read at those points"

step "status"
"$AGENT" status --data "$A"
echo
"$REPLICA" status --data "$R"
echo
"$REPLICA" points --data "$R" --volume demo | (head -5; echo "..."; tail -3)

step "stopping"
for pid in "${PIDS[@]}"; do kill -TERM "$pid"; done
for pid in "${PIDS[@]}"; do wait "$pid"; done
PIDS=()
echo "demo complete"
