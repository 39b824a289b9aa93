#!/usr/bin/python3
"""Drives the cdp NBD server with libnbd, a client nobody in this project wrote.

Usage: libnbd_client.py RW_URI RO_URI REQUEST_BYTES_MAX

RW_URI names a writable export of at least 48 MiB, RO_URI a read-only export of at least
4 KiB. Checks reads, writes (with and without FUA), write-zeroes, trims, flushes and many
requests in flight; then, with libnbd's client-side checks turned off, sends requests the
server must refuse (past the end, longer than the maximum block size, writes to a read-only
export) and checks each error value and that the connection keeps working afterwards.
Exits non-zero with a message on the first failed check.
"""

import errno
import os
import sys

import nbd

MIB = 1 << 20


def fail(message):
    print(f"libnbd client: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def check(condition, message):
    if not condition:
        fail(message)


def expect_error(what, want, call):
    try:
        call()
    except nbd.Error as e:
        if e.errnum != want:
            fail(f"{what}: got errno {e.errnum} ({e.string}), want {want} ({errno.errorcode[want]})")
        return
    fail(f"{what}: succeeded, want errno {want} ({errno.errorcode[want]})")


def wait_all(h, cookies):
    """Waits until every command is answered; aio_command_completed raises on a failed one."""
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for cookie in cookies:
        check(h.aio_command_completed(cookie), f"command {cookie} did not complete")


def main():
    rw_uri, ro_uri, request_max = sys.argv[1], sys.argv[2], int(sys.argv[3])

    h = nbd.NBD()
    h.connect_uri(rw_uri)
    size = h.get_size()
    check(size >= 48 * MIB, f"export size {size} too small for this script")
    check(not h.is_read_only(), "writable export announced read-only")
    check(h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero(), "missing transmission flags")
    check(h.can_multi_conn(), "CAN_MULTI_CONN missing")
    check(h.get_block_size(nbd.SIZE_MINIMUM) == 1, "minimum block size")
    check(h.get_block_size(nbd.SIZE_PREFERRED) == 4096, "preferred block size")
    check(h.get_block_size(nbd.SIZE_MAXIMUM) == request_max, "maximum block size")

    # Plain and FUA writes read back.
    data = os.urandom(MIB)
    h.pwrite(data, 0)
    check(h.pread(MIB, 0) == data, "read after write")
    h.pwrite(data[:4096], 8 * MIB, nbd.CMD_FLAG_FUA)
    check(h.pread(4096, 8 * MIB) == data[:4096], "read after FUA write")
    h.pwrite(b"hello", 12345)
    check(h.pread(5, 12345) == b"hello", "unaligned write")

    # Write-zeroes (with FUA, with NO_HOLE), trims, flush.
    h.zero(65536, 4096, nbd.CMD_FLAG_FUA)
    check(h.pread(65536, 4096) == bytes(65536), "zeroes after FUA write-zeroes")
    h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE)
    check(h.pread(4096, 0) == bytes(4096), "zeroes after NO_HOLE write-zeroes")
    h.trim(2 * MIB, 2 * MIB)
    h.trim(4096, 5 * MIB, nbd.CMD_FLAG_FUA)
    h.flush()
    check(h.pread(MIB // 2, MIB // 2) == data[MIB // 2:], "data beside the zeroed range changed")

    # The largest request, ending exactly at the end of the export.
    big = os.urandom(request_max)
    h.pwrite(big, size - request_max)
    check(h.pread(request_max, size - request_max) == big, "largest request read back")

    # Many requests in flight on one connection.
    base = 16 * MIB
    sources = [nbd.Buffer.from_bytearray(bytearray([i]) * 65536) for i in range(200)]
    cookies = [h.aio_pwrite(sources[i], base + i * 65536) for i in range(200)]
    wait_all(h, cookies)
    buffers = [nbd.Buffer(65536) for _ in range(200)]
    cookies = [h.aio_pread(buffers[i], base + i * 65536) for i in range(200)]
    wait_all(h, cookies)
    for i, buf in enumerate(buffers):
        check(buf.to_bytearray() == bytes([i]) * 65536, f"pipelined read {i}")

    # Requests the server must refuse; the connection must stay usable after each.
    h.set_strict_mode(0)
    expect_error("read past the end", errno.EINVAL, lambda: h.pread(4096, size - 1024))
    expect_error("write past the end", errno.ENOSPC, lambda: h.pwrite(b"x" * 4096, size - 1024))
    expect_error("trim past the end", errno.EINVAL, lambda: h.trim(4096, size - 1024))
    expect_error("zero past the end", errno.ENOSPC, lambda: h.zero(4096, size - 1024))
    expect_error("oversized read", errno.EINVAL, lambda: h.pread(request_max + 4096, 0))
    expect_error("oversized write", errno.EINVAL, lambda: h.pwrite(b"y" * (request_max + 4096), 0))
    check(h.pread(MIB // 2, MIB // 2) == data[MIB // 2:], "refused write changed data")
    check(h.pread(1024, size - 1024) == big[-1024:], "refused write past the end changed data")
    h.pwrite(b"still alive", 0)
    check(h.pread(11, 0) == b"still alive", "connection unusable after refused requests")
    h.flush()
    h.shutdown()

    ro = nbd.NBD()
    ro.connect_uri(ro_uri)
    check(ro.is_read_only(), "read-only export not announced read-only")
    before = ro.pread(4096, 0)
    ro.set_strict_mode(0)
    expect_error("write to read-only", errno.EPERM, lambda: ro.pwrite(b"z" * 512, 0))
    expect_error("trim on read-only", errno.EPERM, lambda: ro.trim(512, 0))
    expect_error("zero on read-only", errno.EPERM, lambda: ro.zero(512, 0))
    check(ro.pread(4096, 0) == before, "read-only export changed")
    ro.flush()
    ro.shutdown()

    print("libnbd client: all checks passed")


if __name__ == "__main__":
    main()
