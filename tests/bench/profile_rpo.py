"""Usage: [NOSTRACE=1 | PERFTRACE=1] [ROUNDS=N] python3 tests/bench/profile_rpo.py (after make release).
Where the shared configuration's RPO lag tail comes from: section 2's 50 % load run, with
the replica's and the agent's syncs traced (strace -T, seccomp-bpf) and the kernel's dirty and
writeback pages sampled, then each batch's lag set against the syncs that overlapped it."""
import os, sys, json, time, subprocess, threading, tempfile, re
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import bench as b

ROUNDS = int(os.environ.get("ROUNDS", "4"))
RUNTIME = 5
work = tempfile.mkdtemp(dir=os.path.join(ROOT, "target"), prefix="rpoprof-")
cfg = b.make_configs()[0]  # shared
size_mib = 1024
dev = os.path.join(work, "repl.img")
b.make_file(dev, size_mib * b.MIB)
cl = b.Cluster(os.path.join(ROOT, "target", "release"), work, "replvol", dev, config=cfg)

def trace(pid, out):
    if os.environ.get("PERFTRACE"):
        return subprocess.Popen(["perf", "trace", "-T", "-e", "fdatasync,fsync", "-o", out, "-p", str(pid)], stderr=subprocess.DEVNULL)
    return subprocess.Popen(["strace", "-f", "--seccomp-bpf", "-ttt", "-T", "-e",
                             "trace=fdatasync,fsync,sync_file_range",
                             "-o", out, "-p", str(pid)], stderr=subprocess.DEVNULL)

def cpu_of(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

def idle():
    f = open("/proc/stat").readline().split()[1:]
    return int(f[3]) / os.sysconf("SC_CLK_TCK"), sum(map(int, f)) / os.sysconf("SC_CLK_TCK")

def sample_mem(stop, out):
    while not stop.is_set():
        m = {}
        for line in open("/proc/meminfo"):
            k, v = line.split(":")
            if k in ("Dirty", "Writeback"):
                m[k] = int(v.split()[0])
        out.append((time.time(), m["Dirty"], m["Writeback"]))
        time.sleep(0.02)

def parse(path, names=("fdatasync", "fsync", "sync_file_range")):
    if os.environ.get("PERFTRACE"):
        return parse_perf(path)
    rx = re.compile(r"^(\d+)\s+(\d+\.\d+) (\w+)\((\d+).*<(\d+\.\d+)>$")
    ev = []
    for line in open(path):
        m = rx.match(line.strip())
        if m and m.group(3) in names:
            end = float(m.group(2)) + float(m.group(5))
            ev.append((float(m.group(2)), end, m.group(3), int(m.group(4)), float(m.group(5)), int(m.group(1))))
    return ev

BOOT = time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)
def parse_perf(path):
    # perf trace -T: " 12345.678 ( 0.123 ms): tokio-rt/123 fdatasync(fd: 24) = 0" with -T the first column is
    # the absolute timestamp in ms (perf clock, CLOCK_MONOTONIC here).
    rx = re.compile(r"^\s*(\d+\.\d+) \(\s*(\d+\.\d+) ms\): ([^/]*)/(\d+) (\w+)\(fd: (\d+)")
    ev = []
    for line in open(path):
        m = rx.match(line)
        if m:
            start = float(m.group(1)) / 1e3 + BOOT
            d = float(m.group(2)) / 1e3
            ev.append((start, start + d, m.group(5), int(m.group(6)), d, int(m.group(4))))
    return ev

try:
    full = []
    for r in range(ROUNDS):
        st = cl.volume_status()["last_seq"]
        f = b.fio(cl.uri, "repl", "write", "1M", 8, runtime=RUNTIME, size=size_mib * b.MIB)
        cl.wait_caught_up()
        rows = b.batch_lags(cl, st)
        first = min(a for a, _, _ in rows); last = max(d for _, d, _ in rows)
        full.append(sum(n for *_, n in rows) / ((last - first) / 1e9) / 1e6)
        rate = max(1, int(b.med(full) / 2))
        st = cl.volume_status()["last_seq"]
        rt = os.path.join(work, f"r{r}.replica.strace"); at = os.path.join(work, f"r{r}.agent.strace")
        NOST = os.environ.get("NOSTRACE")
        if NOST:
            open(rt, "w").close(); open(at, "w").close()
            tr = subprocess.Popen(["perf", "record", "-a", "-g", "-o", os.path.join(work, f"r{r}.perf.data"), "--", "sleep", str(RUNTIME)], stderr=subprocess.DEVNULL) if os.environ.get("PERF") else subprocess.Popen(["sleep", "0"])
            ta = subprocess.Popen(["sleep", "0"])
        else:
            tr = trace(cl.replica.p.pid, rt); ta = trace(cl.agent.p.pid, at)
            time.sleep(1.0)  # tracer attach (setup, not a condition of the measurement)
        stop = threading.Event(); mem = []
        th = threading.Thread(target=sample_mem, args=(stop, mem)); th.start()
        c0 = (cpu_of(cl.agent.p.pid), cpu_of(cl.replica.p.pid), idle(), time.time())
        f = b.fio(cl.uri, "repl", "write", "1M", 8, runtime=RUNTIME, size=size_mib * b.MIB, extra=[f"--rate={rate}m"])
        c1 = (cpu_of(cl.agent.p.pid), cpu_of(cl.replica.p.pid), idle(), time.time())
        cl.wait_caught_up()
        wall = c1[3] - c0[3]
        print(f"  CPU over the fio run: agent {(c1[0]-c0[0])/wall:.2f}, replica {(c1[1]-c0[1])/wall:.2f}, machine busy {1 - (c1[2][0]-c0[2][0])/(c1[2][1]-c0[2][1]):.2f} of 2 CPUs; fio {f['mbps']:.0f} MB/s")
        con = cl.db()
        dec = con.execute("SELECT seq, agent_ns, received_ns, durable_ns FROM batches WHERE seq > ? ORDER BY seq", (st,)).fetchall()
        con.close()
        tot = sorted(((d - a) / 1e6, (r_ - a) / 1e6, (d - r_) / 1e6, s_) for s_, a, r_, d in dec)
        n = len(tot)
        for label, i in (("p50", n // 2), ("p90", int(n * 0.9)), ("p99", min(n - 1, int(n * 0.99))), ("max", n - 1)):
            t = tot[i]
            print(f"  lag {label} {t[0]:.1f} ms = agent seal->replica receive {t[1]:.1f} + receive->durable {t[2]:.1f} (seq {t[3]})")
        recv = sorted(x[1] for x in tot); dur = sorted(x[2] for x in tot)
        print(f"  seal->receive p50 {recv[n//2]:.1f} p99 {recv[min(n-1,int(n*0.99))]:.1f}; receive->durable p50 {dur[n//2]:.1f} p99 {dur[min(n-1,int(n*0.99))]:.1f}")
        stop.set(); th.join(); (tr.wait() if NOST else (tr.send_signal(2), tr.wait())); (ta.send_signal(2) if not NOST else None); ta.wait()
        rows = b.batch_lags(cl, st)
        lags = sorted((d - a) / 1e6 for a, d, _ in rows)
        p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))]
        rs = parse(rt) or [(0, 0, "none", 0, 0.0, 0)]; ags = parse(at)
        rlong = sorted(rs, key=lambda e: -e[4])[:5]
        print(f"round {r+1}: rate {rate} MB/s, {len(rows)} batches, lag p50 {lags[len(lags)//2]:.1f} p99 {p99:.1f} max {lags[-1]:.1f} ms")
        print(f"  replica syncs: {len(rs)}, p50 {sorted(e[4] for e in rs)[len(rs)//2]*1e3:.1f} ms, max {max(e[4] for e in rs)*1e3:.1f} ms; agent syncs {len(ags)}, max {max((e[4] for e in ags), default=0)*1e3:.1f} ms")
        slow = [(a / 1e9, d / 1e9, (d - a) / 1e6) for a, d, _ in rows if (d - a) / 1e6 > 50]
        print(f"  batches over 50 ms: {len(slow)}")
        for a, d, lag in slow[:8]:
            ov = [e for e in rs if e[0] < d and e[1] > a]
            worst = max(ov, key=lambda e: e[4]) if ov else None
            dm = [x for x in mem if a <= x[0] <= d]
            dirty = max((x[1] for x in dm), default=0) // 1024; wb = max((x[2] for x in dm), default=0) // 1024
            w = f"{worst[2]}(fd {worst[3]}) {worst[4]*1e3:.1f} ms" if worst else "none"
            print(f"    lag {lag:.1f} ms: longest replica sync overlapping {w}; dirty max {dirty} MiB, writeback max {wb} MiB")
        for e in rlong:
            print(f"  long replica sync: {e[2]}(fd {e[3]}) {e[4]*1e3:.1f} ms at +{e[0]-mem[0][0]:.2f}s")
        print(f"  dirty max {max(x[1] for x in mem)//1024} MiB, writeback max {max(x[2] for x in mem)//1024} MiB")
        sys.stdout.flush()
finally:
    cl.stop()
    import shutil
    shutil.rmtree(work, ignore_errors=True)
