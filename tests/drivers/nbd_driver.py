#!/usr/bin/python3
"""A scripted NBD client over libnbd (a client nobody here wrote), driven by a test.

Usage: nbd_driver.py URI
Reads one command per line on stdin, as JSON; a write's data follows its line as exactly
`len` raw bytes. Answers one line per command: "ok", "ok <hex>" for a read (hex of the
bytes), or "err <message>".

Commands: {"op": "write", "offset": N, "len": N, "fua": bool}
          {"op": "zero", "offset": N, "len": N, "fua": bool}
          {"op": "trim", "offset": N, "len": N, "fua": bool}
          {"op": "flush"}
          {"op": "read", "offset": N, "len": N}
          {"op": "size"}
"""
import json
import sys

import nbd


def main():
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    stdin = sys.stdin.buffer
    out = sys.stdout
    while True:
        line = stdin.readline()
        if not line:
            break
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            flags = nbd.CMD_FLAG_FUA if cmd.get("fua") else 0
            if op == "write":
                data = stdin.read(cmd["len"])
                h.pwrite(data, cmd["offset"], flags)
                out.write("ok\n")
            elif op == "zero":
                h.zero(cmd["len"], cmd["offset"], flags)
                out.write("ok\n")
            elif op == "trim":
                h.trim(cmd["len"], cmd["offset"], flags)
                out.write("ok\n")
            elif op == "flush":
                h.flush()
                out.write("ok\n")
            elif op == "read":
                data = h.pread(cmd["len"], cmd["offset"])
                out.write("ok " + data.hex() + "\n")
            elif op == "size":
                out.write("ok %d\n" % h.get_size())
            else:
                out.write("err unknown op %s\n" % op)
        except nbd.Error as e:
            out.write("err %s\n" % str(e).replace("\n", " "))
        out.flush()
    h.shutdown()


if __name__ == "__main__":
    main()
