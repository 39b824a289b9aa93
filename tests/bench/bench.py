#!/usr/bin/python3
"""`make bench`: cdp measured side by side with what a user would run instead.

Every comparison runs in this one process tree, alternating the sides (A B A B ...) for
--rounds rounds, and BENCHMARKS.md gets min / median / max of each figure, the ratio per pair,
the machine, and the commands to reproduce. Whole-system figures come from public tools (fio's
JSON output, /proc/PID/stat for CPU time); the replica's own catalog gives durable times.

Sections (issue 3): 1 NBD path (fio nbd engine: agent vs nbdkit file vs qemu-nbd),
2 replication throughput and RPO lag, 3 restore vs cp, 4 instant export, 5 verifier cost,
6 metadata per record and point lookup, 7 CPU per GiB replicated.

Usage: bench.py --bin target/release [--out BENCHMARKS.md] [--rounds 3] [--runtime 5]
                [--nbd-size-mib 1024] [--restore-records 100000] [--meta-records 1000000]
                [--cpu-gib 1] [--export-records 10000,100000,1000000] [--work DIR] [--only 1,2,...]
"""

import argparse
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

MIB = 1 << 20
GIB = 1 << 30


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout


def wait_until(what, timeout, cond, interval=0.05):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def free_udp_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cpu_seconds(pid):
    """user+sys CPU seconds of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def make_file(path, size, random_bytes=0):
    with open(path, "wb") as f:
        f.truncate(size)
        left = random_bytes
        while left > 0:
            n = min(left, 4 * MIB)
            f.write(os.urandom(n))
            left -= n


class Proc:
    def __init__(self, name, cmd, logpath, env=None):
        self.name = name
        self.logf = open(logpath, "w")
        e = dict(os.environ)
        e.update(env or {})
        self.p = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=e)

    def alive(self):
        return self.p.poll() is None

    def stop(self, timeout=30):
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.logf.close()


class Cluster:
    """A replica and an agent protecting one volume, on loopback."""

    def __init__(self, bindir, work, name, device, env=None):
        self.bindir, self.work, self.name, self.device = bindir, work, name, device
        self.rdir = os.path.join(work, f"{name}-replica")
        self.adir = os.path.join(work, f"{name}-agent")
        port = free_udp_port()
        listen = f"127.0.0.1:{port}"
        rfp = run([self.bin("cdp-replica"), "init", "--data", self.rdir, "--listen", listen]).split()[-1]
        afp = run([self.bin("cdp-agent"), "init", "--data", self.adir, "--replica", listen, "--replica-fingerprint", rfp]).split()[-1]
        run([self.bin("cdp-replica"), "authorize", "--data", self.rdir, "--agent", afp])
        run([self.bin("cdp-agent"), "protect", "--data", self.adir, "--volume", name, "--device", device])
        self.replica = Proc("replica", [self.bin("cdp-replica"), "serve", "--data", self.rdir], os.path.join(work, f"{name}-replica.log"), env)
        self.agent = Proc("agent", [self.bin("cdp-agent"), "run", "--data", self.adir], os.path.join(work, f"{name}-agent.log"), env)
        self.sock = os.path.join(self.adir, "nbd.sock")
        wait_until("the agent's socket", 60, lambda: os.path.exists(self.sock))
        wait_until("the initial sync", 600, lambda: self.volume_status()["state"] == "protecting", 0.2)

    def bin(self, name):
        return os.path.join(self.bindir, name)

    @property
    def uri(self):
        return f"nbd+unix:///{self.name}?socket={self.sock}"

    def volume_status(self):
        st = json.loads(run([self.bin("cdp-agent"), "status", "--json", "--data", self.adir]))
        return st["volumes"][0]

    def wait_caught_up(self, timeout=600):
        def done():
            v = self.volume_status()
            return v["acked_seq"] == v["last_seq"]
        wait_until("the replica to catch up", timeout, done, 0.1)

    def bookmark(self, name):
        out = run([self.bin("cdp-agent"), "bookmark", "--data", self.adir, name, "--wait"])
        return int(out.split(" seq ")[1].split()[0])

    def db(self):
        con = sqlite3.connect(f"file:{os.path.join(self.rdir, 'meta.db')}?mode=ro", uri=True, timeout=30)
        return con

    def stop(self):
        self.agent.stop()
        self.replica.stop()


def fio(uri_or_file, name, rw, bs, iodepth, runtime=None, size=None, extra=(), engine="nbd"):
    cmd = ["fio", f"--name={name}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={iodepth}", "--output-format=json", "--randrepeat=0", "--norandommap"]
    if engine == "nbd":
        cmd += ["--ioengine=nbd", f"--uri={uri_or_file}"]
    else:
        cmd += [f"--ioengine={engine}", f"--filename={uri_or_file}"]
    if runtime:
        cmd += ["--time_based", f"--runtime={runtime}"]
    if size:
        cmd += [f"--size={size}"]
    cmd += list(extra)
    out = run(cmd)
    data = json.loads(out[out.index("{"):])
    job = data["jobs"][0]
    side = job["read"] if rw in ("randread", "read") else job["write"]
    pct = side.get("clat_ns", {}).get("percentile", {})
    return {
        "iops": side["iops"],
        "mbps": side["bw_bytes"] / 1e6,
        "p50_us": pct.get("50.000000", 0) / 1000,
        "p99_us": pct.get("99.000000", 0) / 1000,
        "cmd": " ".join(cmd),
    }


def mmm(values):
    return (min(values), statistics.median(values), max(values))


def fmt3(values, digits=1):
    lo, med, hi = mmm(values)
    return f"{lo:.{digits}f} / {med:.{digits}f} / {hi:.{digits}f}"


class Report:
    def __init__(self):
        self.parts = []
        self.commands = []
        self.targets = {}

    def h(self, text):
        self.parts.append(f"\n## {text}\n")

    def p(self, text):
        self.parts.append(text + "\n")

    def table(self, header, rows):
        self.parts.append("| " + " | ".join(header) + " |")
        self.parts.append("|" + "---|" * len(header))
        for r in rows:
            self.parts.append("| " + " | ".join(str(c) for c in r) + " |")
        self.parts.append("")

    def cmd(self, text):
        if text not in self.commands:
            self.commands.append(text)


def machine_info(work):
    cores = os.cpu_count()
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    df = run(["df", "-h", "--output=source,fstype,size,avail", work]).strip().splitlines()[-1].split()
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    kernel = os.uname().release
    return f"{cores} cores ({cpu}), {mem} memory, kernel {kernel}; work directory on {df[0]} ({df[1]}, {df[2]}, {df[3]} free)"


# ---------------------------------------------------------------- 1. NBD write path
def bench_nbd(args, rep, work):
    size = args.nbd_size_mib * MIB
    log(f"section 1: NBD path, {args.rounds} rounds, {args.runtime}s per job, {args.nbd_size_mib} MiB exports")
    files = {k: os.path.join(work, f"nbd-{k}.img") for k in ("agent", "nbdkit", "qemu")}
    for f in files.values():
        make_file(f, size)
    cl = Cluster(args.bin, work, "nbdvol", files["agent"])
    ksock = os.path.join(work, "nbdkit.sock")
    qsock = os.path.join(work, "qemu.sock")
    nbdkit = Proc("nbdkit", ["nbdkit", "-f", "-U", ksock, "file", files["nbdkit"]], os.path.join(work, "nbdkit.log"))
    qemu = Proc("qemu-nbd", ["qemu-nbd", "-t", "-f", "raw", "-k", qsock, "-e", "8", files["qemu"]], os.path.join(work, "qemu-nbd.log"))
    wait_until("nbdkit", 30, lambda: os.path.exists(ksock))
    wait_until("qemu-nbd", 30, lambda: os.path.exists(qsock))
    sides = {"agent": cl.uri, "nbdkit": f"nbd+unix:///?socket={ksock}", "qemu-nbd": f"nbd+unix:///?socket={qsock}"}
    jobs = [
        ("4k randwrite qd1", "randwrite", "4k", 1),
        ("4k randwrite qd32", "randwrite", "4k", 32),
        ("1M write qd8", "write", "1M", 8),
        ("4k randread qd32", "randread", "4k", 32),
    ]
    results = {}
    try:
        for r in range(args.rounds):
            for job, rw, bs, qd in jobs:
                for side, uri in sides.items():
                    res = fio(uri, "nbd", rw, bs, qd, runtime=args.runtime, size=size)
                    results.setdefault((job, side), []).append(res)
                    rep.cmd(res["cmd"].replace(uri, f"<{side} URI>"))
            log(f"  round {r + 1}/{args.rounds} done")
        cl.wait_caught_up()
    finally:
        nbdkit.stop()
        qemu.stop()
        cl.stop()
    rep.h("1. NBD path: fio's nbd engine, agent (replication on) vs nbdkit file vs qemu-nbd")
    rep.p(f"Each job {args.runtime} s over a {args.nbd_size_mib} MiB export backed by a file on the same disk; "
          f"{args.rounds} rounds, sides alternating within each job. Figures are min / median / max. "
          "The agent replicates every write to a replica on loopback while it runs.")
    rows = []
    for job, _, _, _ in jobs:
        for side in sides:
            rs = results[(job, side)]
            rows.append([job, side, fmt3([x["iops"] for x in rs], 0), fmt3([x["mbps"] for x in rs]),
                         fmt3([x["p50_us"] for x in rs]), fmt3([x["p99_us"] for x in rs])])
    rep.table(["job", "server", "IOPS", "MB/s", "p50 µs", "p99 µs"], rows)
    rows = []
    for job, _, _, _ in jobs:
        a = statistics.median(x["iops"] for x in results[(job, "agent")])
        k = statistics.median(x["iops"] for x in results[(job, "nbdkit")])
        q = statistics.median(x["iops"] for x in results[(job, "qemu-nbd")])
        rows.append([job, f"{a / k:.2f}", f"{a / q:.2f}"])
        rep.targets[job] = a / k
    rep.p("Ratio of medians (IOPS; higher is better for the agent):")
    rep.table(["job", "agent / nbdkit", "agent / qemu-nbd"], rows)
    rep.cmd(f"nbdkit -f -U SOCK file FILE    # and: qemu-nbd -t -f raw -k SOCK -e 8 FILE")
    return results


# ---------------------------------------------------------------- 2. replication throughput and lag
def batch_lags(cl, after_seq):
    con = cl.db()
    rows = con.execute("SELECT agent_ns, durable_ns, COALESCE(length, 0) FROM batches WHERE seq > ? ORDER BY seq", (after_seq,)).fetchall()
    con.close()
    return rows


def bench_replication(args, rep, work):
    log("section 2: replication throughput and RPO lag")
    size = args.nbd_size_mib * MIB
    dev = os.path.join(work, "repl.img")
    make_file(dev, size)
    ref_file = os.path.join(work, "disk-ref.dat")
    cl = Cluster(args.bin, work, "replvol", dev)
    runtime = max(args.runtime, 5)
    res = {"disk": [], "full": [], "half": []}
    try:
        for r in range(args.rounds):
            d = fio(ref_file, "disk", "write", "1M", 8, size=f"{args.nbd_size_mib}M", engine="psync", extra=["--end_fsync=1"])
            res["disk"].append(d["mbps"])
            rep.cmd(d["cmd"])
            os.unlink(ref_file)
            for load in ("full", "half"):
                extra = []
                if load == "half":
                    # Half of what the agent sustains end to end (durable on the replica): the
                    # client-facing rate at full load is higher while the spool absorbs it.
                    full = statistics.median(x["durable_mbps"] for x in res["full"])
                    extra = [f"--rate={max(1, int(full / 2))}m"]
                start_seq = cl.volume_status()["last_seq"]
                t0 = time.time()
                f = fio(cl.uri, "repl", "write", "1M", 8, runtime=runtime, size=size, extra=extra)
                rep.cmd(f["cmd"].replace(cl.uri, "<agent URI>"))
                cl.wait_caught_up()
                rows = batch_lags(cl, start_seq)
                if not rows:
                    continue
                first_agent = min(a for a, _, _ in rows)
                last_durable = max(d for _, d, _ in rows)
                total = sum(n for _, _, n in rows)
                lags = sorted((d - a) / 1e6 for a, d, _ in rows)
                res[load].append({
                    "client_mbps": f["mbps"],
                    "durable_mbps": total / ((last_durable - first_agent) / 1e9) / 1e6,
                    "p50": lags[len(lags) // 2],
                    "p99": lags[min(len(lags) - 1, int(len(lags) * 0.99))],
                    "max": lags[-1],
                    "batches": len(rows),
                    "wall": time.time() - t0,
                })
            log(f"  round {r + 1}/{args.rounds} done")
    finally:
        cl.stop()
    rep.h("2. Replication throughput and RPO lag")
    rep.p("1 MiB sequential writes through the agent at full speed and at half the rate the agent sustains end to end "
          "(half the durable MB/s of the full-speed runs, set with fio `--rate`), "
          f"{runtime} s each, alternating with the disk's own sequential write bandwidth (fio psync, 1 MiB, with a final fsync). "
          "Durable MB/s counts journal bytes from the first batch's agent time to the last batch's durable time. "
          "Lag = a batch's durable time on the replica minus its agent time (sealing), from the replica's catalog.")
    rows = [["disk sequential write (reference)", fmt3(res["disk"]), "", "", "", ""]]
    for load, label in (("full", "agent, 100 % load"), ("half", "agent, 50 % load")):
        xs = res[load]
        if not xs:
            continue
        rows.append([label, fmt3([x["client_mbps"] for x in xs]), fmt3([x["durable_mbps"] for x in xs]),
                     fmt3([x["p50"] for x in xs]), fmt3([x["p99"] for x in xs]), fmt3([x["max"] for x in xs])])
    rep.table(["run", "client MB/s", "durable MB/s", "lag p50 ms", "lag p99 ms", "lag max ms"], rows)
    if res["full"] and res["disk"]:
        ratio = statistics.median(x["durable_mbps"] for x in res["full"]) / statistics.median(res["disk"])
        rep.p(f"Sustained replication / disk bandwidth (medians): **{ratio:.2f}** (target ≥ 0.8).")
        rep.targets["replication"] = ratio
    if res["half"]:
        p99 = statistics.median(x['p99'] for x in res['half'])
        rep.p(f"RPO lag p99 at 50 % load (median of rounds): **{p99:.1f} ms** (target ≤ 50 ms).")
        rep.targets["rpo"] = p99
    return res


# ---------------------------------------------------------------- 3 + 6. restore, metadata
def bench_restore(args, rep, work):
    log(f"section 3: restore of a 1 GiB volume with a journal of {args.restore_records} records")
    dev = os.path.join(work, "restore.img")
    make_file(dev, GIB)
    cl = Cluster(args.bin, work, "restvol", dev)
    image = os.path.join(work, "cp-source.img")
    try:
        start = cl.bookmark("restore-start")
        f = fio(cl.uri, "fill", "randwrite", "4k", 32, size=GIB, extra=[f"--number_ios={args.restore_records}"])
        rep.cmd(f["cmd"].replace(cl.uri, "<agent URI>"))
        end = cl.bookmark("restore-end")
        cl.wait_caught_up()
        con = cl.db()
        records = con.execute("SELECT COUNT(*) FROM records").fetchone()[0]
        con.close()
        mid = (start + end) // 2
        shutil.copyfile(dev, image)
        times = {"restore": [], "cp": [], "cp+fsync": []}
        for r in range(args.rounds):
            out = os.path.join(work, "restored.img")
            t0 = time.time()
            run([cl.bin("cdp-replica"), "restore", "--data", cl.rdir, "--volume", "restvol", "--at", f"seq:{mid}", "--out", out])
            times["restore"].append(time.time() - t0)
            os.unlink(out)
            t0 = time.time()
            run(["cp", "--sparse=never", image, out])
            times["cp"].append(time.time() - t0)
            os.unlink(out)
            # restore fsyncs its output before it renames it into place; cp does not.
            t0 = time.time()
            run(["cp", "--sparse=never", image, out])
            run(["sync", out])
            times["cp+fsync"].append(time.time() - t0)
            os.unlink(out)
        rep.cmd(f"cdp-replica restore --data DIR --volume restvol --at seq:{mid} --out OUT    # vs: cp --sparse=never IMAGE OUT [&& sync OUT]")
    finally:
        cl.stop()
    rep.h("3. Restore")
    rep.p(f"A 1 GiB volume with {records} journal records (fio 4 KiB random writes through the agent); "
          f"restore at seq {mid}, the middle of the window, vs `cp --sparse=never` of a 1 GiB image on the same disk, "
          f"and the same cp followed by `sync FILE`; page cache warm for all. Restore fsyncs its output before it renames it "
          f"into place (a restore that returned is on disk); plain cp leaves it in the page cache, so cp + sync is the like-for-like peer.")
    r_mbs = [GIB / t / 1e6 for t in times["restore"]]
    c_mbs = [GIB / t / 1e6 for t in times["cp"]]
    s_mbs = [GIB / t / 1e6 for t in times["cp+fsync"]]
    rep.table(["side", "seconds", "MB/s of image"], [["cdp-replica restore", fmt3(times["restore"], 2), fmt3(r_mbs)],
                                                    ["cp --sparse=never", fmt3(times["cp"], 2), fmt3(c_mbs)],
                                                    ["cp --sparse=never && sync", fmt3(times["cp+fsync"], 2), fmt3(s_mbs)]])
    rep.p(f"restore / cp throughput (medians): **{statistics.median(r_mbs) / statistics.median(c_mbs):.2f}** (target ≥ 0.9); "
          f"restore / (cp + sync): **{statistics.median(r_mbs) / statistics.median(s_mbs):.2f}**.")
    rep.targets["restore"] = statistics.median(r_mbs) / statistics.median(c_mbs)
    os.unlink(image)


def export_first_read_ms(cl, rounds, size):
    """Wall time from starting `cdp-replica export --at latest` to the first 4 KiB read
    completed through libnbd, `rounds` times (a new export process each time, a different
    chunk each time)."""
    import nbd
    sock = os.path.join(cl.work, f"{cl.name}-export.sock")
    out = []
    for r in range(rounds):
        offset = random.randrange(size // 4096) * 4096
        t0 = time.perf_counter()
        p = subprocess.Popen([cl.bin("cdp-replica"), "export", "--data", cl.rdir, "--volume", cl.name,
                              "--at", "latest", "--socket", sock],
                             stdout=subprocess.DEVNULL, stderr=open(os.path.join(cl.work, "export.log"), "a"))
        try:
            while True:
                h = nbd.NBD()
                h.set_export_name(cl.name)
                try:
                    h.connect_unix(sock)
                    break
                except nbd.Error:
                    if p.poll() is not None or time.perf_counter() - t0 > 60:
                        raise RuntimeError("the export did not start; see export.log")
                    time.sleep(0.001)
            h.pread(4096, offset)
            out.append((time.perf_counter() - t0) * 1000)
            h.shutdown()
        finally:
            p.terminate()
            p.wait()
    return out


def bench_export(args, rep, work):
    log(f"section 4: instant export at {args.export_records}")
    size = 256 * MIB
    dev = os.path.join(work, "export.img")
    make_file(dev, size)
    cl = Cluster(args.bin, work, "expvol", dev)
    rows = []
    try:
        done = 0
        for target in args.export_records:
            f = fio(cl.uri, "exp", "randwrite", "512", 32, size=size, extra=[f"--io_size={(target - done) * 512}"])
            rep.cmd(f["cmd"].replace(cl.uri, "<agent URI>"))
            cl.bookmark(f"records-{target}")
            cl.wait_caught_up(1800)
            con = cl.db()
            records = con.execute("SELECT COUNT(*) FROM records").fetchone()[0]
            con.close()
            done = target
            ms = export_first_read_ms(cl, args.rounds * 2, size)
            rows.append([f"{records}", f"{records // (size // MIB)}", fmt3(ms)])
            if target == args.export_records[-1]:
                rep.targets["export"] = statistics.median(ms)
        rep.cmd("cdp-replica export --data DIR --volume expvol --at latest --socket S  # then one 4 KiB pread through libnbd")
    finally:
        cl.stop()
    rep.h("4. Instant export")
    rep.p(f"Time from starting `cdp-replica export --at latest` (with `serve` running) to the first 4 KiB read completed "
          f"through libnbd, at a random offset of a {size // MIB} MiB volume whose journal holds the records below "
          f"(fio 512-byte random writes through the agent): a new export process per measurement, {args.rounds * 2} per row.")
    rep.table(["journal records", "records per 1 MiB chunk", "first read, ms"], rows)


def set_verifier_rate(rdir, rate):
    """Sets `[verifier] chunks_per_sec` in replica.toml (read when serve starts)."""
    path = os.path.join(rdir, "replica.toml")
    lines = open(path).read().splitlines()
    out, in_section, done = [], False, False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("["):
            if in_section and not done:
                out.append(f"chunks_per_sec = {rate}")
                done = True
            in_section = stripped == "[verifier]"
        if in_section and stripped.startswith("chunks_per_sec"):
            line, done = f"chunks_per_sec = {rate}", True
        out.append(line)
    if not done:
        if not in_section:
            out.append("[verifier]")
        out.append(f"chunks_per_sec = {rate}")
    open(path, "w").write("\n".join(out) + "\n")


def bench_verifier(args, rep, work):
    log("section 5: ingest with the verifier off and at its default rate")
    size = 512 * MIB
    dev = os.path.join(work, "verify.img")
    make_file(dev, size)
    cl = Cluster(args.bin, work, "vervol", dev)
    res = {"off": [], "default (2 chunks/s)": []}
    checks = 0
    try:
        for r in range(args.rounds):
            for mode, rate in (("off", 0), ("default (2 chunks/s)", 2)):
                cl.replica.stop()
                set_verifier_rate(cl.rdir, rate)
                cl.replica = Proc("replica", [cl.bin("cdp-replica"), "serve", "--data", cl.rdir],
                                  os.path.join(work, f"vervol-replica-{r}-{rate}.log"))
                cl.wait_caught_up()
                t0 = time.time()
                f = fio(cl.uri, "verify-cost", "write", "1M", 8, size=size,
                        extra=["--refill_buffers", f"--io_size={args.verify_mib * MIB}"])
                rep.cmd(f["cmd"].replace(cl.uri, "<agent URI>"))
                cl.wait_caught_up(1800)
                res[mode].append(args.verify_mib * MIB / (time.time() - t0) / 1e6)
        con = cl.db()
        try:
            checks = con.execute("SELECT COUNT(*) FROM verify_results").fetchone()[0]
        except sqlite3.Error:
            checks = 0
        con.close()
    finally:
        cl.stop()
    rep.h("5. Verifier cost")
    rep.p(f"{args.verify_mib} MiB of 1 MiB sequential writes through the agent per run, until the replica has made it all durable "
          f"(MB/s of writes made durable), with the replica's background verifier off and at its default rate; the replica "
          f"restarts between runs with `[verifier] chunks_per_sec` set, sides alternating, {args.rounds} rounds. "
          f"The verifier recorded {checks} checks in the runs.")
    rep.table(["verifier", "MB/s durable"], [[k, fmt3(v)] for k, v in res.items()])
    off, on = statistics.median(res["off"]), statistics.median(res["default (2 chunks/s)"])
    cost = (1 - on / off) * 100
    rep.p(f"cost of the default rate (medians): **{cost:.1f} %** (target ≤ 3 %; negative: within the noise).")
    rep.targets["verifier"] = cost


def bench_metadata(args, rep, work):
    log(f"section 6: metadata at {args.meta_records} records")
    dev = os.path.join(work, "meta.img")
    make_file(dev, 256 * MIB)
    cl = Cluster(args.bin, work, "metavol", dev)
    try:
        t0 = time.time()
        f = fio(cl.uri, "meta", "randwrite", "512", 32, size=256 * MIB, extra=[f"--io_size={args.meta_records * 512}"])
        rep.cmd(f["cmd"].replace(cl.uri, "<agent URI>"))
        end = cl.bookmark("meta-end")
        cl.wait_caught_up(1800)
        fill = time.time() - t0
        # Let the server checkpoint the WAL into meta.db before measuring the file.
        cl.replica.stop()
        con = cl.db()
        records = con.execute("SELECT COUNT(*) FROM records").fetchone()[0]
        batches = con.execute("SELECT COUNT(*) FROM batches").fetchone()[0]
        con.close()
        db_bytes = sum(os.path.getsize(os.path.join(cl.rdir, n)) for n in os.listdir(cl.rdir) if n.startswith("meta.db"))
        lookups = {"seq": [], "bookmark": [], "time": []}
        con = cl.db()
        mid_time = con.execute("SELECT agent_ns FROM batches WHERE seq = ?", (end // 2,)).fetchone()[0]
        con.close()
        import datetime
        t_mid = datetime.datetime.fromtimestamp(mid_time / 1e9, datetime.timezone.utc).isoformat().replace("+00:00", "Z")
        for r in range(args.rounds):
            for kind, point in (("seq", f"seq:{end // 2}"), ("bookmark", "bookmark:meta-end"), ("time", t_mid)):
                t0 = time.time()
                run([cl.bin("cdp-replica"), "points", "--data", cl.rdir, "--volume", "metavol", "--at", point])
                lookups[kind].append((time.time() - t0) * 1000)
        rep.cmd("cdp-replica points --data DIR --volume metavol --at POINT")
    finally:
        cl.stop()
    rep.h("6. Metadata")
    rep.p(f"{records} records in {batches} batches (fio 512-byte random writes through the agent, {fill:.0f} s to write and replicate). "
          f"SQLite (meta.db with its WAL) holds **{db_bytes / max(records, 1):.1f} bytes per record**.")
    rep.p("Point lookup: the wall time of `cdp-replica points --at POINT` (a whole process: start, open the catalog, resolve, print):")
    rep.table(["lookup", "ms"], [[k, fmt3(v)] for k, v in lookups.items()])


# ---------------------------------------------------------------- 7. CPU per GiB
def bench_cpu(args, rep, work):
    log(f"section 7: CPU per GiB, {args.cpu_gib} GiB per run")
    size = args.cpu_gib * GIB
    res = {"incompressible": {"agent": [], "replica": []}, "half-zero": {"agent": [], "replica": []}}
    dev = os.path.join(work, "cpu.img")
    make_file(dev, min(size, GIB))
    cl = Cluster(args.bin, work, "cpuvol", dev)
    try:
        for r in range(args.rounds):
            for kind, extra in (("incompressible", ["--refill_buffers"]), ("half-zero", ["--refill_buffers", "--buffer_compress_percentage=50", "--buffer_compress_chunk=4k"])):
                a0, r0 = cpu_seconds(cl.agent.p.pid), cpu_seconds(cl.replica.p.pid)
                f = fio(cl.uri, "cpu", "write", "1M", 8, size=min(size, GIB), extra=extra + [f"--io_size={size}"])
                rep.cmd(f["cmd"].replace(cl.uri, "<agent URI>"))
                cl.wait_caught_up()
                a1, r1 = cpu_seconds(cl.agent.p.pid), cpu_seconds(cl.replica.p.pid)
                res[kind]["agent"].append((a1 - a0) / args.cpu_gib)
                res[kind]["replica"].append((r1 - r0) / args.cpu_gib)
    finally:
        cl.stop()
    rep.h("7. CPU per GiB replicated")
    rep.p(f"user+sys CPU seconds (from /proc/PID/stat) per GiB written through the agent with 1 MiB writes and replicated, {args.cpu_gib} GiB per run.")
    rows = []
    for kind in res:
        rows.append([kind, fmt3(res[kind]["agent"], 2), fmt3(res[kind]["replica"], 2)])
    rep.table(["data", "agent CPU-s / GiB", "replica CPU-s / GiB"], rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release")
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio job in sections 1 and 2")
    ap.add_argument("--nbd-size-mib", type=int, default=1024)
    ap.add_argument("--restore-records", type=int, default=100000)
    ap.add_argument("--meta-records", type=int, default=1000000)
    ap.add_argument("--cpu-gib", type=int, default=1)
    ap.add_argument("--verify-mib", type=int, default=1024, help="MiB written per run in section 5")
    ap.add_argument("--export-records", default="10000,100000,1000000",
                    help="journal sizes (records, ascending) at which section 4 measures the export")
    ap.add_argument("--work", default=None, help="work directory (default: a temporary directory under target/)")
    ap.add_argument("--only", default="1,2,3,4,5,6,7")
    args = ap.parse_args()
    args.bin = os.path.abspath(args.bin)
    args.export_records = [int(x) for x in args.export_records.split(",")]
    only = {int(x) for x in args.only.split(",")}
    base = args.work or os.path.join(os.path.dirname(args.bin), "bench-work")
    os.makedirs(base, exist_ok=True)
    work = tempfile.mkdtemp(dir=base)
    rep = Report()
    started = time.time()
    try:
        sections = [bench_nbd, bench_replication, bench_restore, bench_export, bench_verifier,
                    bench_metadata, bench_cpu]
        for n, section in enumerate(sections, start=1):
            if n not in only:
                continue
            # Each section in a directory of its own, removed when it ends: the sections'
            # volumes and journals together would need tens of GB.
            sub = os.path.join(work, f"section-{n}")
            os.makedirs(sub)
            try:
                section(args, rep, sub)
            finally:
                shutil.rmtree(sub, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    head = [
        "# Benchmarks",
        "",
        f"Measured by `make bench` (tests/bench/bench.py) at commit `{git}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"in {time.time() - started:.0f} s.",
        "",
        f"Machine: {machine_info(base)}.",
        "",
        "The machine is shared and noisy (disk and NBD figures drift 20–30 % between runs), so every comparison "
        "alternates the sides within one run and reports min / median / max over the rounds; ratios are of medians.",
        "",
        f"Parameters: `--rounds {args.rounds} --runtime {args.runtime} --nbd-size-mib {args.nbd_size_mib} "
        f"--restore-records {args.restore_records} --meta-records {args.meta_records} --cpu-gib {args.cpu_gib}`. "
        "A bigger run: `make bench BENCH_ARGS='--rounds 5 --runtime 30 --nbd-size-mib 4096'`.",
    ]
    t = rep.targets
    def cell(key, fmt, ok):
        if key not in t:
            return ["not measured in this run", ""]
        v = t[key]
        return [fmt.format(v), "met" if ok(v) else "not met"]
    summary = ["", "## Targets", "", "| target | this run | |", "|---|---|---|"]
    for label, key, fmt, ok in [
        ("agent / nbdkit ≥ 1.0, 4 KiB random writes qd32", "4k randwrite qd32", "{:.2f}", lambda v: v >= 1.0),
        ("agent / nbdkit ≥ 1.0, 1 MiB sequential writes", "1M write qd8", "{:.2f}", lambda v: v >= 1.0),
        ("sustained replication ≥ 0.8 × disk bandwidth", "replication", "{:.2f}", lambda v: v >= 0.8),
        ("RPO lag p99 ≤ 50 ms at 50 % load", "rpo", "{:.1f} ms", lambda v: v <= 50),
        ("restore ≥ 0.9 × cp", "restore", "{:.2f}", lambda v: v >= 0.9),
    ]:
        summary.append("| " + " | ".join([label] + cell(key, fmt, ok)) + " |")
    last = args.export_records[-1]
    summary.append("| " + " | ".join([f"instant export first read < 100 ms at 10⁶ records (this run: {last})"]
                                     + cell("export", "{:.0f} ms", lambda v: v < 100)) + " |")
    summary.append("| " + " | ".join(["verifier at default rate costs ≤ 3 %"]
                                     + cell("verifier", "{:.1f} %", lambda v: v <= 3)) + " |")
    summary.append("")
    rep.parts = summary + rep.parts
    history = os.path.join(os.path.dirname(os.path.abspath(__file__)), "history.md")
    notes = [open(history).read()] if os.path.exists(history) else []
    tail = notes + ["", "## Commands", "", "Every command the run executed (URIs and paths abbreviated):", "", "```"] + rep.commands + ["```", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(head) + "\n" + "\n".join(rep.parts) + "\n".join(tail))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
