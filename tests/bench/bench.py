#!/usr/bin/python3
"""`make bench`: cdp measured side by side with what a user would run instead.

Every comparison runs in this one process tree, alternating the sides (A B A B ...) for
--rounds rounds, and BENCHMARKS.md gets min / median / max of each figure, the ratio of the
medians per pair, the machine, and the commands to reproduce. Whole-system figures come from
public tools (fio's JSON output, /proc/PID/stat for CPU time, /proc/PID/status for memory); the
replica's own catalog gives durable times.

Two CPU configurations (issue 12), run in the same run and alternating round by round in
sections 1, 2 and 7:
  shared  everything on every CPU (fio, the server under test, the replica);
  split   the replica on another machine, modelled with `taskset`: fio and the server under
          test (agent, nbdkit, qemu-nbd, the replicating peer's front end) on CPU 0, the
          replica (and the replicating peer's remote target) on CPU 1. Running processes are
          moved between configurations with `taskset -a -p -c CPUS PID` (all threads).

Sections:
  1 NBD path: fio's nbd engine against the agent (replicating), nbdkit file, qemu-nbd, and a
    replicating peer (qemu-storage-daemon: a quorum of the local file and an NBD target, or
    with --peer mirror a write-blocking blockdev-mirror; every write acked once both copies
    are written); 4 KiB random writes qd1 / qd32, 1 MiB sequential writes qd8, 4 KiB random
    reads qd32, and flush latency (4 KiB random writes with fsync=1 at qd1); both configs.
  2 replication throughput and RPO lag, against the disk (O_DIRECT, and buffered with an
    fdatasync every 4 MiB like the journal's group commits); agent and replica peak RSS at
    full load; both configs.
  3 restore vs cp --sparse=never (and cp && sync).
  4 instant export: time to the first read at 10^4..10^6 journal records.
  5 verifier cost: ingest with the verifier off vs at its default rate.
  6 metadata per record and point lookup.
  7 CPU seconds and peak RSS per GiB replicated; both configs.
  8 export read throughput: `cdp-replica export` of a point vs nbdkit serving the same point
    restored to a file (4 KiB random reads qd32, 1 MiB sequential reads qd8).

Usage: bench.py --bin target/release [--out BENCHMARKS.md] [--rounds 3] [--runtime 5]
                [--nbd-size-mib 1024] [--peer quorum|mirror] [--restore-records 100000]
                [--meta-records 1000000] [--cpu-gib 1] [--export-records 10000,100000,1000000]
                [--export-read-size-mib 512] [--export-read-write-mib 256]
                [--work DIR] [--only 1,2,...] [--nbd-jobs 'JOB,...']
At the defaults about 20 minutes on 2 cores (section 1 about 12 of them). A quick check of
the harness itself: --rounds 1 --runtime 2 --nbd-size-mib 256 --only N.
"""

import argparse
import contextlib
import filecmp
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


# The tools each section runs, checked before anything starts.
TOOLS = {
    1: ["fio", "nbdkit", "qemu-nbd", "qemu-storage-daemon", "taskset"],
    2: ["fio", "taskset"],
    3: ["fio", "cp", "sync"],
    4: ["fio"],
    5: ["fio"],
    6: ["fio"],
    7: ["fio", "taskset"],
    8: ["fio", "nbdkit"],
}


def require_tools(sections):
    missing = sorted({t for n in sections for t in TOOLS.get(n, []) if shutil.which(t) is None})
    try:
        import nbd  # noqa: F401  (sections 4 and 8 read through libnbd)
    except ImportError:
        if {4, 8} & set(sections):
            missing.append("python3 module nbd (python3-libnbd)")
    if missing:
        raise SystemExit(f"bench: missing {', '.join(missing)}; `make deps` (tests/scripts/deps.sh) installs them")


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


def mem_mib(pid):
    """(VmHWM, VmRSS) of a process in MiB, from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(rest.split()[0]) / 1024
    return out["VmHWM"], out["VmRSS"]


def reset_peak_rss(pid):
    """Resets VmHWM to the current RSS (`echo 5 > /proc/PID/clear_refs`), so that the next
    reading is the peak of what follows; False when the kernel does not allow it."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_file(path, size, random_bytes=0):
    with open(path, "wb") as f:
        f.truncate(size)
        left = random_bytes
        while left > 0:
            n = min(left, 4 * MIB)
            f.write(os.urandom(n))
            left -= n


# ---------------------------------------------------------------- CPU configurations
def parse_cpus(text):
    """'0-1,3' -> {0, 1, 3}"""
    out = set()
    for part in text.strip().split(","):
        if "-" in part:
            a, b = part.split("-")
            out.update(range(int(a), int(b) + 1))
        elif part:
            out.add(int(part))
    return out


def pin_running(pid, cpus):
    """Pins every thread of a running process to `cpus` (`taskset -a -p -c CPUS PID`), again
    until /proc/PID/task/*/status shows every thread there (a thread started while taskset
    walked the list would keep the old mask)."""
    want = parse_cpus(cpus)

    def pinned():
        run(["taskset", "-a", "-p", "-c", cpus, str(pid)])
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith("Cpus_allowed_list:") and parse_cpus(line.split(":", 1)[1]) != want:
                            return False
            except FileNotFoundError:
                pass  # the thread ended
        return True
    wait_until(f"pid {pid}'s threads on CPUs {cpus}", 30, pinned, 0.05)


class Config:
    """Where the processes of a run sit. `front`: fio and the server under test; `back`: the
    replica and the replicating peer's remote target. None: not pinned (every CPU)."""

    def __init__(self, name, front, back, everything):
        self.name, self.front, self.back, self.everything = name, front, back, everything

    @property
    def front_cpus(self):
        return self.front if self.front is not None else self.everything

    @property
    def back_cpus(self):
        return self.back if self.back is not None else self.everything


def make_configs():
    cpus = sorted(os.sched_getaffinity(0))
    everything = ",".join(map(str, cpus))
    configs = [Config("shared", None, None, everything)]
    if len(cpus) >= 2:
        configs.append(Config("split", str(cpus[0]), str(cpus[1]), everything))
    else:
        log("only one CPU: the split configuration is not measured")
    return configs


def pin_all(config, front=(), back=()):
    """Moves running processes (Proc) into `config`."""
    for p in front:
        p.pin(config.front_cpus)
    for p in back:
        p.pin(config.back_cpus)


# ---------------------------------------------------------------- processes
class Proc:
    def __init__(self, name, cmd, logpath, env=None, pin=None):
        """`pin`: CPUs (taskset -c list) to start the process on, None for any."""
        self.name = name
        self.logpath = logpath
        if pin is not None:
            cmd = ["taskset", "-c", str(pin)] + list(cmd)
        self.cmd = cmd
        self.logf = open(logpath, "w")
        e = dict(os.environ)
        e.update(env or {})
        self.p = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=e)

    def alive(self):
        return self.p.poll() is None

    def pin(self, cpus):
        pin_running(self.p.pid, cpus)

    def log_tail(self, n=2000):
        try:
            with open(self.logpath, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def stop(self, timeout=30):
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.logf.close()


def wait_listening(proc, sock, timeout=60):
    """Waits until a unix socket accepts connections; fails at once if the process died."""
    def up():
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.p.returncode}) before listening on {sock}:\n{proc.log_tail()}")
        if not os.path.exists(sock):
            return False
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(sock)
            return True
        except OSError:
            return False
        finally:
            s.close()
    wait_until(f"{proc.name} on {sock}", timeout, up, 0.02)


class Cluster:
    """A replica and an agent protecting one volume, on loopback. `config`: where they start
    (agent on its front CPUs, replica on its back CPUs); `pin` moves them."""

    def __init__(self, bindir, work, name, device, env=None, config=None):
        self.bindir, self.work, self.name, self.device = bindir, work, name, device
        self.rdir = os.path.join(work, f"{name}-replica")
        self.adir = os.path.join(work, f"{name}-agent")
        port = free_udp_port()
        listen = f"127.0.0.1:{port}"
        rfp = run([self.bin("cdp-replica"), "init", "--data", self.rdir, "--listen", listen]).split()[-1]
        afp = run([self.bin("cdp-agent"), "init", "--data", self.adir, "--replica", listen, "--replica-fingerprint", rfp]).split()[-1]
        run([self.bin("cdp-replica"), "authorize", "--data", self.rdir, "--agent", afp])
        run([self.bin("cdp-agent"), "protect", "--data", self.adir, "--volume", name, "--device", device])
        self.replica = Proc("replica", [self.bin("cdp-replica"), "serve", "--data", self.rdir],
                            os.path.join(work, f"{name}-replica.log"), env, pin=config.back if config else None)
        self.agent = None
        try:
            self.agent = Proc("agent", [self.bin("cdp-agent"), "run", "--data", self.adir],
                              os.path.join(work, f"{name}-agent.log"), env, pin=config.front if config else None)
            self.sock = os.path.join(self.adir, "nbd.sock")
            wait_until("the agent's socket", 60, lambda: os.path.exists(self.sock))
            wait_until("the initial sync", 600, lambda: self.volume_status()["state"] == "protecting", 0.2)
        except BaseException:
            self.stop()
            raise

    def bin(self, name):
        return os.path.join(self.bindir, name)

    @property
    def uri(self):
        return f"nbd+unix:///{self.name}?socket={self.sock}"

    def pin(self, config):
        pin_all(config, front=[self.agent], back=[self.replica])

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

    def record_count(self):
        """Journal records in the replica's catalog."""
        con = self.db()
        try:
            return con.execute("SELECT COUNT(*) FROM records").fetchone()[0]
        finally:
            con.close()

    def db(self):
        con = sqlite3.connect(f"file:{os.path.join(self.rdir, 'meta.db')}?mode=ro", uri=True, timeout=30)
        return con

    def reset_peak_rss(self):
        return reset_peak_rss(self.agent.p.pid) & reset_peak_rss(self.replica.p.pid)

    def mem(self):
        """{'agent': (VmHWM, VmRSS), 'replica': (...)} in MiB."""
        return {"agent": mem_mib(self.agent.p.pid), "replica": mem_mib(self.replica.p.pid)}

    def stop(self):
        if self.agent:
            self.agent.stop()
        self.replica.stop()


# ---------------------------------------------------------------- the replicating peer
class QMP:
    """A minimal QMP client (JSON lines over a unix socket); events are skipped."""

    def __init__(self, path, timeout=30):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.f = self.s.makefile("rw")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self):
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError("QMP connection closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def execute(self, cmd, **arguments):
        self.f.write(json.dumps({"execute": cmd, "arguments": arguments}) + "\n")
        self.f.flush()
        msg = self._read()
        if "error" in msg:
            raise RuntimeError(f"QMP {cmd} {arguments}: {msg['error']}")
        return msg["return"]

    def close(self):
        self.f.close()
        self.s.close()


def peer_qsd_cmd(mode, local, tsock, sock, qmp):
    """qemu-storage-daemon: `local` (a file node) exported over NBD on `sock`, with an NBD client
    node `remote` to the target on `tsock`. quorum: the export is a quorum node over both
    (vote-threshold 2: a write completes once both children wrote it; flushes go to both; reads
    from the local file, read-pattern fifo). mirror: the export is the local node; a
    blockdev-mirror job (QMP) in copy-mode write-blocking copies it to `remote`. The export runs
    in an iothread of its own (in a quick A/B on this machine, 10-30 % more IOPS than in the
    main loop)."""
    cmd = ["qemu-storage-daemon", "--object", "iothread,id=iot0",
           "--chardev", f"socket,path={qmp},server=on,wait=off,id=qmp0", "--monitor", "chardev=qmp0",
           "--blockdev", f"driver=file,node-name=local,filename={local}",
           "--blockdev", f"driver=nbd,node-name=remote,server.type=unix,server.path={tsock}"]
    node = "local"
    if mode == "quorum":
        cmd += ["--blockdev", "driver=quorum,node-name=peer,children.0=local,children.1=remote,vote-threshold=2,read-pattern=fifo"]
        node = "peer"
    cmd += ["--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", f"type=nbd,id=peer,node-name={node},name=peer,writable=on,iothread=iot0"]
    return cmd


MIRROR_ARGS = {"job-id": "mirror0", "device": "local", "target": "remote", "sync": "full",
               "copy-mode": "write-blocking", "auto-finalize": False, "auto-dismiss": False}


class Peer:
    """The replicating peer: qemu-storage-daemon (front end, on the config's front CPUs) in front
    of a local file, and `nbdkit file` on a second file as its remote target (back CPUs)."""

    def __init__(self, work, local, remote, mode, config):
        self.mode, self.local, self.remote = mode, local, remote
        self.tsock = os.path.join(work, "peer-target.sock")
        self.sock = os.path.join(work, "peer.sock")
        self.qmp_sock = os.path.join(work, "peer-qmp.sock")
        self.qsd = None
        self.target = Proc("peer target (nbdkit)", ["nbdkit", "-f", "-U", self.tsock, "file", remote],
                           os.path.join(work, "peer-target.log"), pin=config.back)
        try:
            wait_listening(self.target, self.tsock)
            self.qsd = Proc("qemu-storage-daemon", peer_qsd_cmd(mode, local, self.tsock, self.sock, self.qmp_sock),
                            os.path.join(work, "peer.log"), pin=config.front)
            wait_listening(self.qsd, self.sock)
            wait_listening(self.qsd, self.qmp_sock)
            if mode == "mirror":
                qmp = QMP(self.qmp_sock)
                try:
                    qmp.execute("blockdev-mirror", **MIRROR_ARGS)

                    def ready():
                        jobs = qmp.execute("query-block-jobs")
                        if not jobs or jobs[0].get("error") or jobs[0]["status"] in ("concluded", "aborting", "null"):
                            raise RuntimeError(f"the mirror job failed: {jobs}\n{self.qsd.log_tail()}")
                        return jobs[0]["ready"]
                    wait_until("the mirror job to be ready", 600, ready, 0.1)
                finally:
                    qmp.close()
        except BaseException:
            self.stop()
            raise

    @property
    def uri(self):
        return f"nbd+unix:///peer?socket={self.sock}"

    @property
    def procs(self):
        return self.qsd, self.target

    def commands(self):
        """The commands, with paths abbreviated, for the report."""
        out = [f"nbdkit -f -U TSOCK file REMOTE.img    # the peer's remote target",
               " ".join(peer_qsd_cmd(self.mode, "LOCAL.img", "TSOCK", "SOCK", "QMP.sock"))]
        if self.mode == "mirror":
            out += ['# QMP on QMP.sock: {"execute": "qmp_capabilities"}',
                    "# " + json.dumps({"execute": "blockdev-mirror", "arguments": MIRROR_ARGS}),
                    '# {"execute": "query-block-jobs"} until the job shows "ready": true']
        return out

    def stop(self):
        if self.qsd:
            self.qsd.stop()
        self.target.stop()


# ---------------------------------------------------------------- fio
def fio(uri_or_file, name, rw, bs, iodepth, runtime=None, size=None, extra=(), engine="nbd", pin=None):
    """Runs one fio job (JSON output). `bs` None: the block size comes from `extra` (--bsrange).
    `pin`: CPUs to run fio on (taskset -c), None for any."""
    cmd = ["fio", f"--name={name}", f"--rw={rw}"] + ([f"--bs={bs}"] if bs else []) + [
        f"--iodepth={iodepth}", "--output-format=json", "--randrepeat=0", "--norandommap"]
    if engine == "nbd":
        cmd += ["--ioengine=nbd", f"--uri={uri_or_file}"]
    else:
        cmd += [f"--ioengine={engine}", f"--filename={uri_or_file}"]
    if runtime:
        cmd += ["--time_based", f"--runtime={runtime}"]
    if size:
        cmd += [f"--size={size}"]
    cmd += list(extra)
    if pin is not None:
        cmd = ["taskset", "-c", str(pin)] + cmd
    out = run(cmd)
    data = json.loads(out[out.index("{"):])
    job = data["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio reported error {job['error']}: {' '.join(cmd)}")
    side = job["read"] if rw in ("randread", "read") else job["write"]
    pct = side.get("clat_ns", {}).get("percentile", {})
    # With --fsync=N, fio reports the flushes under "sync": lat_ns of each fsync (here an NBD
    # flush), from its issue after the write completed to its completion.
    sync = job.get("sync", {})
    spct = sync.get("lat_ns", {}).get("percentile", {})
    ios = side.get("total_ios", 0)
    return {
        "iops": side["iops"],
        "mbps": side["bw_bytes"] / 1e6,
        "p50_us": pct.get("50.000000", 0) / 1000,
        "p99_us": pct.get("99.000000", 0) / 1000,
        "syncs": sync.get("total_ios", 0),
        "sync_p50_us": spct.get("50.000000", 0) / 1000,
        "sync_p99_us": spct.get("99.000000", 0) / 1000,
        # Mean time per I/O over the job (with fsync=1 at qd1: per write + flush cycle).
        "cycle_us": job.get("job_runtime", 0) * 1000 / ios if ios else 0,
        "cmd": " ".join(cmd),
    }


def mmm(values):
    return (min(values), statistics.median(values), max(values))


def fmt3(values, digits=1):
    lo, med, hi = mmm(values)
    return f"{lo:.{digits}f} / {med:.{digits}f} / {hi:.{digits}f}"


def med(values):
    return statistics.median(values)


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

    def peak(self, key, value):
        """Keeps the largest value seen under `key` (peak RSS over sections)."""
        self.targets[key] = max(value, self.targets.get(key, value))


def pin_cmds(rep, configs):
    for c in configs:
        if c.front is not None:
            rep.cmd(f"taskset -a -p -c {c.front} PID    # {c.name}: fio, the agent, nbdkit, qemu-nbd, qemu-storage-daemon "
                    f"(processes start under `taskset -c {c.front}`, fio too)")
            rep.cmd(f"taskset -a -p -c {c.back} PID    # {c.name}: the replica, the peer's nbdkit target")
        else:
            rep.cmd(f"taskset -a -p -c {c.everything} PID    # {c.name}: every process on every CPU; fio unpinned")


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


# ---------------------------------------------------------------- 1. NBD path
FLUSH_JOB = "4k randwrite qd1 fsync=1"
NBD_JOBS = [
    ("4k randwrite qd1", "randwrite", "4k", 1, []),
    ("4k randwrite qd32", "randwrite", "4k", 32, []),
    ("1M write qd8", "write", "1M", 8, []),
    ("4k randread qd32", "randread", "4k", 32, []),
    (FLUSH_JOB, "randwrite", "4k", 1, ["--fsync=1"]),
]
NBD_SIDES = ("agent", "nbdkit", "qemu-nbd", "peer")


def bench_nbd(args, rep, work):
    size = args.nbd_size_mib * MIB
    configs = args.configs
    log(f"section 1: NBD path, {args.rounds} rounds, {args.runtime}s per job, {args.nbd_size_mib} MiB exports, "
        f"configs {', '.join(c.name for c in configs)}, peer {args.peer}")
    files = {k: os.path.join(work, f"nbd-{k}.img") for k in ("agent", "nbdkit", "qemu", "peer-local", "peer-remote")}
    for f in files.values():
        make_file(f, size)
    first = configs[0]
    jobs = [j for j in NBD_JOBS if args.nbd_jobs is None or j[0] in args.nbd_jobs]
    results = {}
    with contextlib.ExitStack() as stack:
        cl = Cluster(args.bin, work, "nbdvol", files["agent"], config=first)
        stack.callback(cl.stop)
        ksock = os.path.join(work, "nbdkit.sock")
        qsock = os.path.join(work, "qemu.sock")
        nbdkit = Proc("nbdkit", ["nbdkit", "-f", "-U", ksock, "file", files["nbdkit"]], os.path.join(work, "nbdkit.log"), pin=first.front)
        stack.callback(nbdkit.stop)
        qemu = Proc("qemu-nbd", ["qemu-nbd", "-t", "-f", "raw", "-k", qsock, "-e", "8", files["qemu"]],
                    os.path.join(work, "qemu-nbd.log"), pin=first.front)
        stack.callback(qemu.stop)
        wait_listening(nbdkit, ksock)
        wait_listening(qemu, qsock)
        peer = Peer(work, files["peer-local"], files["peer-remote"], args.peer, first)
        stack.callback(peer.stop)
        sides = {"agent": cl.uri, "nbdkit": f"nbd+unix:///?socket={ksock}", "qemu-nbd": f"nbd+unix:///?socket={qsock}", "peer": peer.uri}
        for r in range(args.rounds):
            for config in configs:
                cl.pin(config)
                pin_all(config, front=[nbdkit, qemu, peer.qsd], back=[peer.target])
                for job, rw, bs, qd, extra in jobs:
                    for side, uri in sides.items():
                        res = fio(uri, "nbd", rw, bs, qd, runtime=args.runtime, size=size, extra=extra, pin=config.front)
                        results.setdefault((config.name, job, side), []).append(res)
                        rep.cmd(res["cmd"].replace(uri, f"<{side} URI>"))
                        if side == "agent":
                            # Not measured: the replica drains the agent's backlog before the
                            # next side runs, so that no side pays for the agent's replication.
                            cl.wait_caught_up()
                log(f"  round {r + 1}/{args.rounds}, {config.name} done")
        peer_cmds = peer.commands()
    # Both copies of the peer, compared once it stopped: it did replicate every write.
    peer_same = filecmp.cmp(files["peer-local"], files["peer-remote"], shallow=False)
    if not peer_same:
        raise RuntimeError("the replicating peer's local and remote copies differ after the run")

    rep.h("1. NBD path: fio's nbd engine, agent (replicating) vs nbdkit file vs qemu-nbd vs a replicating peer")
    peer_text = ("a quorum node (vote-threshold 2, read-pattern fifo) over the local file and an NBD client node to the "
                 "target: every write is written to both and completes when both did, a flush flushes both, reads come "
                 "from the local file" if args.peer == "quorum" else
                 "the local file with a `blockdev-mirror` job (sync full, copy-mode write-blocking) to an NBD client node "
                 "to the target, started over QMP and measured once it reports ready: every write completes when both "
                 "copies are written, but a flush reaches the local file only (mirror's filter node flushes its source)")
    rep.p(f"Each job {args.runtime} s over a {args.nbd_size_mib} MiB export backed by a file on the same disk; "
          f"{args.rounds} rounds; in each round the configurations one after the other ({', '.join(c.name for c in configs)}), "
          "and within one the sides one after the other for each job. Figures are min / median / max over the rounds. "
          "The agent replicates every write to a replica on loopback while it runs; after each agent job the harness "
          "waits (unmeasured) until the replica has caught up, so that its backlog does not run under the next side. "
          f"**Replicating peer**: `qemu-storage-daemon` serving NBD from a local file, its second copy on `nbdkit file` "
          f"(a second file) over a unix socket: {peer_text}. After the run the two copies were compared: identical.")
    rep.p("**Configurations.** shared: every process on both CPUs. split (the replica on another machine): fio and the "
          "server under test (agent, nbdkit, qemu-nbd, qemu-storage-daemon) on CPU 0; the replica and the peer's "
          "nbdkit target on CPU 1 (`taskset`).")
    rows = []
    for config in configs:
        for job, _, _, _, _ in jobs:
            if job == FLUSH_JOB:
                continue
            for side in NBD_SIDES:
                rs = results[(config.name, job, side)]
                rows.append([config.name, job, side, fmt3([x["iops"] for x in rs], 0), fmt3([x["mbps"] for x in rs]),
                             fmt3([x["p50_us"] for x in rs]), fmt3([x["p99_us"] for x in rs])])
    rep.table(["config", "job", "server", "IOPS", "MB/s", "p50 µs", "p99 µs"], rows)
    rows = []
    for config in configs:
        for job, _, _, _, _ in jobs:
            if job == FLUSH_JOB:
                continue
            m = {side: med(x["iops"] for x in results[(config.name, job, side)]) for side in NBD_SIDES}
            rows.append([config.name, job, f"{m['agent'] / m['nbdkit']:.2f}", f"{m['agent'] / m['qemu-nbd']:.2f}",
                         f"{m['agent'] / m['peer']:.2f}"])
            rep.targets[("nbd", config.name, job, "nbdkit")] = m["agent"] / m["nbdkit"]
            rep.targets[("nbd", config.name, job, "peer")] = m["agent"] / m["peer"]
    rep.p("Ratio of medians (IOPS; higher is better for the agent):")
    rep.table(["config", "job", "agent / nbdkit", "agent / qemu-nbd", "agent / peer"], rows)

    if FLUSH_JOB not in (j[0] for j in jobs):
        rep.cmd("nbdkit -f -U SOCK file FILE    # and: qemu-nbd -t -f raw -k SOCK -e 8 FILE")
        return results
    rep.p(f"**Flush latency**: 4 KiB random writes at qd1 with `--fsync=1` (fio issues an NBD flush after each write "
          f"completed, and the next write after the flush completed), {args.runtime} s per side. fio reports the write's "
          "completion latency (`write.clat_ns`) and the flush's (`sync.lat_ns`) separately, not their sum; the flush's "
          "completion is the moment the write is acknowledged as durable (write then flush acked), so the headline is the "
          "flush latency. Mean cycle = job runtime / writes (one write and one flush, with fio's own time).")
    rows = []
    for config in configs:
        for side in NBD_SIDES:
            rs = results[(config.name, FLUSH_JOB, side)]
            rows.append([config.name, side, fmt3([x["iops"] for x in rs], 0), fmt3([x["cycle_us"] for x in rs]),
                         fmt3([x["p50_us"] for x in rs]), fmt3([x["p99_us"] for x in rs]),
                         fmt3([x["sync_p50_us"] for x in rs]), fmt3([x["sync_p99_us"] for x in rs])])
    rep.table(["config", "server", "write+flush cycles/s", "mean cycle µs", "write p50 µs", "write p99 µs",
               "**flush p50 µs**", "**flush p99 µs**"], rows)
    rows = []
    for config in configs:
        m = {side: (med(x["sync_p50_us"] for x in results[(config.name, FLUSH_JOB, side)]),
                    med(x["sync_p99_us"] for x in results[(config.name, FLUSH_JOB, side)])) for side in NBD_SIDES}
        rows.append([config.name] + [f"{m['agent'][i] / m[o][i]:.2f}" for o in ("nbdkit", "qemu-nbd", "peer") for i in (0, 1)])
        rep.targets[("flush", config.name, "nbdkit")] = m["agent"][1] / m["nbdkit"][1]
        rep.targets[("flush", config.name, "peer")] = m["agent"][1] / m["peer"][1]
    rep.p("Ratio of medians of the flush latency (lower is better for the agent):")
    rep.table(["config", "agent / nbdkit p50", "agent / nbdkit p99", "agent / qemu-nbd p50", "agent / qemu-nbd p99",
               "agent / peer p50", "agent / peer p99"], rows)
    rep.cmd("nbdkit -f -U SOCK file FILE    # and: qemu-nbd -t -f raw -k SOCK -e 8 FILE")
    for c in peer_cmds:
        rep.cmd(c)
    return results


# ---------------------------------------------------------------- 2. replication throughput and lag
def batch_lags(cl, after_seq):
    con = cl.db()
    rows = con.execute("SELECT agent_ns, durable_ns, COALESCE(length, 0) FROM batches WHERE seq > ? ORDER BY seq", (after_seq,)).fetchall()
    con.close()
    return rows


# The disk references: (label, fio engine, iodepth, extra). The replica appends to a journal
# segment and fdatasyncs it once per group commit; about 4 MiB a batch at full load, hence an
# fdatasync every 4 writes of 1 MiB.
DISK_REFS = [
    ("O_DIRECT (libaio, qd8)", "libaio", 8, ["--direct=1", "--end_fsync=1"]),
    ("buffered, fdatasync every 4 MiB (psync)", "psync", 1, ["--fdatasync=4", "--end_fsync=1"]),
]
DISK_REF = DISK_REFS[1][0]  # what the replication ratio is taken against


def mem_rows(mems):
    """mems: list of Cluster.mem() -> cells: agent peak, replica peak, agent end, replica end."""
    return [fmt3([m["agent"][0] for m in mems], 0), fmt3([m["replica"][0] for m in mems], 0),
            fmt3([m["agent"][1] for m in mems], 0), fmt3([m["replica"][1] for m in mems], 0)]


def bench_replication(args, rep, work):
    configs = args.configs
    log(f"section 2: replication throughput and RPO lag, configs {', '.join(c.name for c in configs)}")
    size = args.nbd_size_mib * MIB
    dev = os.path.join(work, "repl.img")
    make_file(dev, size)
    ref_file = os.path.join(work, "disk-ref.dat")
    runtime = max(args.runtime, 5)
    disk = {label: [] for label, _, _, _ in DISK_REFS}
    res = {c.name: {"full": [], "half": []} for c in configs}
    mems = {c.name: [] for c in configs}
    peak_reset = True
    with contextlib.ExitStack() as stack:
        cl = Cluster(args.bin, work, "replvol", dev, config=configs[0])
        stack.callback(cl.stop)
        for r in range(args.rounds):
            for label, engine, qd, extra in DISK_REFS:
                d = fio(ref_file, "disk", "write", "1M", qd, size=f"{args.nbd_size_mib}M", engine=engine, extra=extra)
                disk[label].append(d["mbps"])
                rep.cmd(d["cmd"].replace(ref_file, "NEW-FILE"))
                os.unlink(ref_file)
            for config in configs:
                cl.pin(config)
                for load in ("full", "half"):
                    extra = []
                    if load == "half":
                        # Half of what the agent sustains end to end (durable on the replica) in
                        # this configuration: the client-facing rate at full load is higher while
                        # the spool absorbs it.
                        full = med(x["durable_mbps"] for x in res[config.name]["full"])
                        extra = [f"--rate={max(1, int(full / 2))}m"]
                    else:
                        peak_reset &= cl.reset_peak_rss()
                    start_seq = cl.volume_status()["last_seq"]
                    t0 = time.time()
                    f = fio(cl.uri, "repl", "write", "1M", 8, runtime=runtime, size=size, extra=extra, pin=config.front)
                    rep.cmd(f["cmd"].replace(cl.uri, "<agent URI>"))
                    cl.wait_caught_up()
                    if load == "full":
                        mems[config.name].append(cl.mem())
                    rows = batch_lags(cl, start_seq)
                    if not rows:
                        continue
                    first_agent = min(a for a, _, _ in rows)
                    last_durable = max(d for _, d, _ in rows)
                    total = sum(n for _, _, n in rows)
                    lags = sorted((d - a) / 1e6 for a, d, _ in rows)
                    res[config.name][load].append({
                        "client_mbps": f["mbps"],
                        "durable_mbps": total / ((last_durable - first_agent) / 1e9) / 1e6,
                        "p50": lags[len(lags) // 2],
                        "p99": lags[min(len(lags) - 1, int(len(lags) * 0.99))],
                        "max": lags[-1],
                        "batches": len(rows),
                        "wall": time.time() - t0,
                    })
                log(f"  round {r + 1}/{args.rounds}, {config.name} done")
    rep.h("2. Replication throughput and RPO lag")
    rep.p("1 MiB sequential writes through the agent at full speed and at half the rate the agent sustains end to end "
          "in the same configuration (half the durable MB/s of its full-speed runs, set with fio `--rate`), "
          f"{runtime} s each; each round starts with the disk's own sequential write bandwidth, on a new file of "
          f"{args.nbd_size_mib} MiB next to the journal: with O_DIRECT (libaio, 1 MiB, qd8), and buffered with an "
          "fdatasync every 4 writes (psync, 1 MiB) — the journal's pattern: the replica appends batches to a segment "
          "and fdatasyncs it once per group commit, about 4 MiB at full load. Both end with an fsync. The replication "
          "ratio is taken against the buffered + fdatasync reference. "
          "Durable MB/s counts journal bytes from the first batch's agent time to the last batch's durable time. "
          "Lag = a batch's durable time on the replica minus its agent time (sealing), from the replica's catalog. "
          "Configurations as in section 1 (split: fio and the agent on CPU 0, the replica on CPU 1).")
    rows = [["", f"disk, {label} (reference)", fmt3(disk[label]), "", "", "", ""] for label, _, _, _ in DISK_REFS]
    for config in configs:
        for load, label in (("full", "agent, 100 % load"), ("half", "agent, 50 % load")):
            xs = res[config.name][load]
            if not xs:
                continue
            rows.append([config.name, label, fmt3([x["client_mbps"] for x in xs]), fmt3([x["durable_mbps"] for x in xs]),
                         fmt3([x["p50"] for x in xs]), fmt3([x["p99"] for x in xs]), fmt3([x["max"] for x in xs])])
    rep.table(["config", "run", "client MB/s", "durable MB/s", "lag p50 ms", "lag p99 ms", "lag max ms"], rows)
    rows = []
    for config in configs:
        xs = res[config.name]
        row = [config.name]
        if xs["full"]:
            durable = med(x["durable_mbps"] for x in xs["full"])
            ratios = {label: durable / med(disk[label]) for label, _, _, _ in DISK_REFS}
            rep.targets[("repl", config.name)] = ratios[DISK_REF]
            row += [f"**{ratios[DISK_REF]:.2f}**", f"{ratios[DISK_REFS[0][0]]:.2f}"]
        else:
            row += ["", ""]
        if xs["half"]:
            worst = max(x["p99"] for x in xs["half"])
            rep.targets[("rpo", config.name)] = worst
            row.append(f"**{worst:.1f}**")
        else:
            row.append("")
        rows.append(row)
    rep.p("Sustained replication / disk bandwidth (durable MB/s at full load / the disk's MB/s, medians) and the RPO "
          "lag p99 at 50 % load in the worst round:")
    rep.table(["config", "replication / disk (buffered + fdatasync)", "replication / disk (O_DIRECT)",
               "worst round's lag p99 at 50 % load, ms"], rows)
    rep.p("Memory at full load (MiB, min / median / max over rounds): peak RSS (VmHWM from /proc/PID/status, "
          + ("reset with `echo 5 > /proc/PID/clear_refs` before each full-load run, so it is the peak of that run and its catch-up"
             if peak_reset else "since the process started: the kernel refused to reset it")
          + ") and RSS at the end (VmRSS, once the replica caught up):")
    rep.table(["config", "agent peak RSS", "replica peak RSS", "agent RSS at end", "replica RSS at end"],
              [[c.name] + mem_rows(mems[c.name]) for c in configs if mems[c.name]])
    for config in configs:
        for who in ("agent", "replica"):
            if mems[config.name]:
                rep.peak(("mem", config.name, who), max(m[who][0] for m in mems[config.name]))
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
        records = cl.record_count()
        mid = (start + end) // 2
        shutil.copyfile(dev, image)
        times = {"restore": [], "cp": [], "cp+fsync": []}
        for r in range(args.rounds):
            out = os.path.join(work, "restored.img")
            # Each side starts with no dirty data of another pending (the source image just
            # copied, the previous side's file): otherwise its sync waits behind that writeback.
            run(["sync"])
            t0 = time.time()
            run([cl.bin("cdp-replica"), "restore", "--data", cl.rdir, "--volume", "restvol", "--at", f"seq:{mid}", "--out", out])
            times["restore"].append(time.time() - t0)
            os.unlink(out)
            run(["sync"])
            t0 = time.time()
            run(["cp", "--sparse=never", image, out])
            times["cp"].append(time.time() - t0)
            os.unlink(out)
            run(["sync"])
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
          f"and the same cp followed by `sync FILE`; page cache warm for all, and a `sync` before each timed side (none waits behind another's writeback). Restore fsyncs its output before it renames it "
          f"into place (a restore that returned is on disk); plain cp leaves it in the page cache, so cp + sync is the like-for-like peer.")
    r_mbs = [GIB / t / 1e6 for t in times["restore"]]
    c_mbs = [GIB / t / 1e6 for t in times["cp"]]
    s_mbs = [GIB / t / 1e6 for t in times["cp+fsync"]]
    rep.table(["side", "seconds", "MB/s of image"], [["cdp-replica restore", fmt3(times["restore"], 2), fmt3(r_mbs)],
                                                    ["cp --sparse=never", fmt3(times["cp"], 2), fmt3(c_mbs)],
                                                    ["cp --sparse=never && sync", fmt3(times["cp+fsync"], 2), fmt3(s_mbs)]])
    rep.p(f"restore / (cp + sync) throughput (medians): **{statistics.median(r_mbs) / statistics.median(s_mbs):.2f}** "
          f"(target ≥ 1.0); restore / cp: {statistics.median(r_mbs) / statistics.median(c_mbs):.2f}.")
    rep.targets["restore"] = statistics.median(r_mbs) / statistics.median(s_mbs)
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
            records = cl.record_count()
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
    configs = args.configs
    log(f"section 7: CPU per GiB, {args.cpu_gib} GiB per run, configs {', '.join(c.name for c in configs)}")
    size = args.cpu_gib * GIB
    kinds = [("incompressible", ["--refill_buffers"]),
             ("half-zero", ["--refill_buffers", "--buffer_compress_percentage=50", "--buffer_compress_chunk=4k"])]
    res = {(c.name, k): {"agent": [], "replica": [], "mem": []} for c in configs for k, _ in kinds}
    dev = os.path.join(work, "cpu.img")
    make_file(dev, min(size, GIB))
    peak_reset = True
    with contextlib.ExitStack() as stack:
        cl = Cluster(args.bin, work, "cpuvol", dev, config=configs[0])
        stack.callback(cl.stop)
        for r in range(args.rounds):
            for config in configs:
                cl.pin(config)
                for kind, extra in kinds:
                    peak_reset &= cl.reset_peak_rss()
                    a0, r0 = cpu_seconds(cl.agent.p.pid), cpu_seconds(cl.replica.p.pid)
                    f = fio(cl.uri, "cpu", "write", "1M", 8, size=min(size, GIB), extra=extra + [f"--io_size={size}"], pin=config.front)
                    rep.cmd(f["cmd"].replace(cl.uri, "<agent URI>"))
                    cl.wait_caught_up()
                    a1, r1 = cpu_seconds(cl.agent.p.pid), cpu_seconds(cl.replica.p.pid)
                    x = res[(config.name, kind)]
                    x["agent"].append((a1 - a0) / args.cpu_gib)
                    x["replica"].append((r1 - r0) / args.cpu_gib)
                    x["mem"].append(cl.mem())
            log(f"  round {r + 1}/{args.rounds} done")
    rep.h("7. CPU per GiB replicated")
    rep.p(f"user+sys CPU seconds (from /proc/PID/stat) per GiB written through the agent with 1 MiB writes (fio, qd8, "
          f"{args.cpu_gib} GiB per run) and replicated, until the replica caught up; configurations as in section 1, "
          "alternating within each round. Peak RSS: VmHWM over the run "
          + ("(reset before it through /proc/PID/clear_refs)" if peak_reset else "(since the process started)")
          + "; RSS at end: VmRSS once the replica caught up; MiB. Min / median / max over rounds.")
    rows = []
    for config in configs:
        for kind, _ in kinds:
            x = res[(config.name, kind)]
            rows.append([config.name, kind, fmt3(x["agent"], 2), fmt3(x["replica"], 2)] + mem_rows(x["mem"]))
    rep.table(["config", "data", "agent CPU-s / GiB", "replica CPU-s / GiB", "agent peak RSS MiB", "replica peak RSS MiB",
               "agent RSS at end MiB", "replica RSS at end MiB"], rows)
    for config in configs:
        x = res[(config.name, "incompressible")]
        rep.targets[("cpu", config.name, "agent")] = med(x["agent"])
        rep.targets[("cpu", config.name, "replica")] = med(x["replica"])
        for kind, _ in kinds:
            for who in ("agent", "replica"):
                rep.peak(("mem", config.name, who), max(m[who][0] for m in res[(config.name, kind)]["mem"]))


# ---------------------------------------------------------------- 8. export read throughput
EXPORT_READ_JOBS = [
    ("4k randread qd32", "randread", "4k", 32),
    ("1M read qd8", "read", "1M", 8),
]


def same_reads(sock_a, name_a, sock_b, name_b, size, n=32):
    """Reads the same n random 64 KiB ranges through two NBD servers; True when they match."""
    import nbd
    handles = []
    for sock, name in ((sock_a, name_a), (sock_b, name_b)):
        h = nbd.NBD()
        h.set_export_name(name)
        h.connect_unix(sock)
        handles.append(h)
    try:
        for _ in range(n):
            off = random.randrange(size // 65536) * 65536
            if handles[0].pread(65536, off) != handles[1].pread(65536, off):
                return False
        return True
    finally:
        for h in handles:
            h.shutdown()


def bench_export_read(args, rep, work):
    size = args.export_read_size_mib * MIB
    log(f"section 8: export read throughput, {args.export_read_size_mib} MiB volume, "
        f"{args.export_read_write_mib} MiB of journal, {args.rounds} rounds, {args.runtime}s per job")
    dev = os.path.join(work, "xread.img")
    make_file(dev, size, random_bytes=size)
    image = os.path.join(work, "xread-restored.img")
    results = {}
    with contextlib.ExitStack() as stack:
        cl = Cluster(args.bin, work, "xreadvol", dev)
        stack.callback(cl.stop)
        f = fio(cl.uri, "journal", "randwrite", None, 32, size=size,
                extra=["--bsrange=4k-64k", f"--io_size={args.export_read_write_mib}M", "--refill_buffers"])
        rep.cmd(f["cmd"].replace(cl.uri, "<agent URI>"))
        point = cl.bookmark("xread")
        cl.wait_caught_up()
        records = cl.record_count()
        t0 = time.time()
        run([cl.bin("cdp-replica"), "restore", "--data", cl.rdir, "--volume", cl.name, "--at", "bookmark:xread", "--out", image])
        restore_s = time.time() - t0
        rep.cmd("cdp-replica restore --data DIR --volume xreadvol --at bookmark:xread --out IMAGE")
        ksock = os.path.join(work, "xread-nbdkit.sock")
        xsock = os.path.join(work, "xread-export.sock")
        nbdkit = Proc("nbdkit", ["nbdkit", "-r", "-f", "-U", ksock, "file", image], os.path.join(work, "xread-nbdkit.log"))
        stack.callback(nbdkit.stop)
        export = Proc("cdp-replica export", [cl.bin("cdp-replica"), "export", "--data", cl.rdir, "--volume", cl.name,
                                             "--at", "bookmark:xread", "--socket", xsock], os.path.join(work, "xread-export.log"))
        stack.callback(export.stop)
        wait_listening(nbdkit, ksock)
        wait_listening(export, xsock)
        rep.cmd("nbdkit -r -f -U SOCK file IMAGE    # vs: cdp-replica export --data DIR --volume xreadvol --at bookmark:xread --socket SOCK")
        if not same_reads(xsock, cl.name, ksock, "", size):
            raise RuntimeError("the export and the restored image differ")
        sides = {"export": f"nbd+unix:///{cl.name}?socket={xsock}", "nbdkit": f"nbd+unix:///?socket={ksock}"}
        for r in range(args.rounds):
            for job, rw, bs, qd in EXPORT_READ_JOBS:
                for side, uri in sides.items():
                    res = fio(uri, "xread", rw, bs, qd, runtime=args.runtime, size=size)
                    results.setdefault((job, side), []).append(res)
                    rep.cmd(res["cmd"].replace(uri, f"<{side} URI>"))
            log(f"  round {r + 1}/{args.rounds} done")
    rep.h("8. Export read throughput")
    rep.p(f"A {args.export_read_size_mib} MiB volume of random data, then {args.export_read_write_mib} MiB of fio random "
          f"writes of 4–64 KiB through the agent: {records} journal records, bookmarked, replicated. The bookmark is "
          f"restored to a file ({restore_s:.1f} s) served by `nbdkit -r file`, and the same point is served by "
          "`cdp-replica export --at bookmark:xread` (the image reconstructed from the base and the journal, `serve` "
          "running); 32 random 64 KiB reads through both matched. fio reads, "
          f"{args.runtime} s per job, the sides alternating within each job, {args.rounds} rounds; page cache warm for "
          "both (the image and the journal were just written). Shared configuration.")
    rows = []
    for job, _, _, _ in EXPORT_READ_JOBS:
        for side in sides:
            rs = results[(job, side)]
            rows.append([job, side, fmt3([x["iops"] for x in rs], 0), fmt3([x["mbps"] for x in rs]),
                         fmt3([x["p50_us"] for x in rs]), fmt3([x["p99_us"] for x in rs])])
    rep.table(["job", "server", "IOPS", "MB/s", "p50 µs", "p99 µs"], rows)
    rows = []
    for job, _, _, _ in EXPORT_READ_JOBS:
        ratio = med(x["iops"] for x in results[(job, "export")]) / med(x["iops"] for x in results[(job, "nbdkit")])
        rep.targets[("export-read", job)] = ratio
        rows.append([job, f"**{ratio:.2f}**"])
    rep.p("Ratio of medians (IOPS):")
    rep.table(["job", "export / nbdkit"], rows)


# ---------------------------------------------------------------- the targets table
def targets_table(rep, args):
    t = rep.targets
    names = [c.name for c in args.configs]

    def ge(x):
        return lambda v: v >= x

    def le(x):
        return lambda v: v <= x

    def row(figure, parts, fmt, target, ok, checked):
        """parts: [(label, key)]; the target is met when every value whose label is in
        `checked` passes `ok` (labels: configurations, or '' for a single value)."""
        got = [(label, t[key]) for label, key in parts if key in t]
        if not got:
            return [figure, "not measured in this run", target, "not measured in this run"]
        shown = ", ".join((f"{label} " if label else "") + fmt.format(v) for label, v in got)
        need = [(label, key) for label, key in parts if label in checked]
        if any(key not in t for _, key in need):
            status = "not measured in this run"
        else:
            status = "met" if all(ok(t[key]) for _, key in need) else "not met"
        return [figure, shown, target, status]

    def both(kind, *rest):
        return [(c, (kind, c) + rest) for c in ("shared", "split")]

    rows = [
        row("4 KiB random reads qd32, agent / nbdkit", [(c, ("nbd", c, "4k randread qd32", "nbdkit")) for c in ("shared", "split")],
            "{:.2f}", "≥ 1.0 (checked on shared)", ge(1.0), ["shared"]),
        row("4 KiB random writes qd32, agent / nbdkit, split", [("split", ("nbd", "split", "4k randwrite qd32", "nbdkit"))],
            "{:.2f}", "≥ 0.8", ge(0.8), ["split"]),
        row("4 KiB random writes qd32, agent / replicating peer, split", [("split", ("nbd", "split", "4k randwrite qd32", "peer"))],
            "{:.2f}", "≥ 1.0", ge(1.0), ["split"]),
        row("4 KiB random writes qd32, agent / nbdkit, shared", [("shared", ("nbd", "shared", "4k randwrite qd32", "nbdkit"))],
            "{:.2f}", "≥ 0.5", ge(0.5), ["shared"]),
        row("1 MiB sequential writes qd8, agent / nbdkit, split", [("split", ("nbd", "split", "1M write qd8", "nbdkit"))],
            "{:.2f}", "≥ 0.8", ge(0.8), ["split"]),
        row("1 MiB sequential writes qd8, agent / nbdkit, shared", [("shared", ("nbd", "shared", "1M write qd8", "nbdkit"))],
            "{:.2f}", "≥ 0.5", ge(0.5), ["shared"]),
        row("flush latency p99 (4 KiB random writes, fsync=1, qd1), agent / nbdkit", both("flush", "nbdkit"),
            "{:.2f}", "≤ 2.0 (in both configs)", le(2.0), ["shared", "split"]),
        row("sustained replication / disk sequential write (buffered + fdatasync every 4 MiB)", both("repl"),
            "{:.2f}", "≥ 0.9 (in both configs)", ge(0.9), ["shared", "split"]),
        row("RPO lag p99 at 50 % load, worst round", both("rpo"),
            "{:.1f} ms", "≤ 50 ms in every round (in both configs)", le(50), ["shared", "split"]),
        row("restore / (cp --sparse=never && sync)", [("", "restore")], "{:.2f}", "≥ 1.0", ge(1.0), [""]),
        row("export / nbdkit on the restored image, 4 KiB random reads qd32", [("", ("export-read", "4k randread qd32"))],
            "{:.2f}", "≥ 0.7", ge(0.7), [""]),
        row("export / nbdkit on the restored image, 1 MiB sequential reads qd8", [("", ("export-read", "1M read qd8"))],
            "{:.2f}", "≥ 0.7", ge(0.7), [""]),
        row("CPU-s per GiB replicated, incompressible, agent", both("cpu", "agent"),
            "{:.2f}", "≤ 1.8 (in both configs)", le(1.8), ["shared", "split"]),
        row("CPU-s per GiB replicated, incompressible, replica", both("cpu", "replica"),
            "{:.2f}", "≤ 1.2 (in both configs)", le(1.2), ["shared", "split"]),
    ]
    mem = [f"{c}: agent {t[('mem', c, 'agent')]:.0f} MiB, replica {t[('mem', c, 'replica')]:.0f} MiB"
           for c in names if ("mem", c, "agent") in t]
    rows.append(["peak RSS at full load (max over sections 2 and 7)", "; ".join(mem) or "not measured in this run",
                 "reported", "reported" if mem else "not measured in this run"])
    last = args.export_records[-1]
    rows.append(row(f"instant export first read at 10⁶ records (this run: {last})", [("", "export")],
                    "{:.0f} ms", "< 100 ms", lambda v: v < 100, [""]))
    rows.append(row("verifier at default rate, ingest cost", [("", "verifier")], "{:.1f} %", "≤ 3 %", le(3), [""]))
    if "split" not in names:
        rows.append(["(split configuration)", "not measured in this run: fewer than 2 CPUs", "", ""])
    out = ["", "## Targets", "",
           "Issue 12's targets, measured the way a user runs it. shared: fio, the server under test and the replica on "
           "the same 2 CPUs; split: the replica on a CPU of its own (see section 1). A target naming no configuration "
           "must hold in both.", "",
           "| figure | this run | target | |", "|---|---|---|---|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out.append("")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release")
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio job in sections 1, 2 and 8")
    ap.add_argument("--nbd-size-mib", type=int, default=1024)
    ap.add_argument("--peer", choices=("quorum", "mirror"), default="quorum",
                    help="section 1's replicating peer: a qemu quorum node (default) or a write-blocking blockdev-mirror")
    ap.add_argument("--restore-records", type=int, default=100000)
    ap.add_argument("--meta-records", type=int, default=1000000)
    ap.add_argument("--cpu-gib", type=int, default=1)
    ap.add_argument("--verify-mib", type=int, default=1024, help="MiB written per run in section 5")
    ap.add_argument("--export-records", default="10000,100000,1000000",
                    help="journal sizes (records, ascending) at which section 4 measures the export")
    ap.add_argument("--export-read-size-mib", type=int, default=512, help="section 8's volume")
    ap.add_argument("--export-read-write-mib", type=int, default=256,
                    help="MiB of 4-64 KiB random writes journaled in section 8 before it reads")
    ap.add_argument("--work", default=None, help="work directory (default: a temporary directory under target/)")
    ap.add_argument("--only", default="1,2,3,4,5,6,7,8")
    ap.add_argument("--nbd-jobs", default=None,
                    help="section 1's jobs to run, by name, comma-separated (default all: "
                    + ", ".join(j[0] for j in NBD_JOBS) + ")")
    args = ap.parse_args()
    args.bin = os.path.abspath(args.bin)
    args.export_records = [int(x) for x in args.export_records.split(",")]
    if args.nbd_jobs is not None:
        args.nbd_jobs = [x.strip() for x in args.nbd_jobs.split(",")]
        unknown = [x for x in args.nbd_jobs if x not in (j[0] for j in NBD_JOBS)]
        if unknown:
            raise SystemExit(f"bench: unknown --nbd-jobs {unknown}; known: {[j[0] for j in NBD_JOBS]}")
    only = {int(x) for x in args.only.split(",")}
    require_tools(only)
    for name in ("cdp-agent", "cdp-replica"):
        if not os.access(os.path.join(args.bin, name), os.X_OK):
            raise SystemExit(f"bench: no {name} in {args.bin} (`make release` builds it)")
    # SIGTERM unwinds like Ctrl-C, so that every finally block stops what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.configs = make_configs()
    base = args.work or os.path.join(os.path.dirname(args.bin), "bench-work")
    os.makedirs(base, exist_ok=True)
    work = tempfile.mkdtemp(dir=base)
    rep = Report()
    if only & {1, 2, 7}:
        pin_cmds(rep, args.configs)
    started = time.time()
    timings = []
    try:
        sections = [bench_nbd, bench_replication, bench_restore, bench_export, bench_verifier,
                    bench_metadata, bench_cpu, bench_export_read]
        for n, section in enumerate(sections, start=1):
            if n not in only:
                continue
            # Each section in a directory of its own, removed when it ends: the sections'
            # volumes and journals together would need tens of GB.
            sub = os.path.join(work, f"section-{n}")
            os.makedirs(sub)
            t0 = time.time()
            try:
                section(args, rep, sub)
            finally:
                shutil.rmtree(sub, ignore_errors=True)
            timings.append(f"{n}: {time.time() - t0:.0f} s")
            log(f"section {n} took {time.time() - t0:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    head = [
        "# Benchmarks",
        "",
        f"Measured by `make bench` (tests/bench/bench.py) at commit `{git}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"in {time.time() - started:.0f} s (per section: {', '.join(timings)}).",
        "",
        f"Machine: {machine_info(base)}.",
        "",
        "The machine is shared and noisy (disk and NBD figures drift 20–30 % between runs), so every comparison "
        "alternates the sides within one run and reports min / median / max over the rounds; ratios are of medians.",
        "",
        f"Parameters: `--rounds {args.rounds} --runtime {args.runtime} --nbd-size-mib {args.nbd_size_mib} --peer {args.peer} "
        f"--restore-records {args.restore_records} --meta-records {args.meta_records} --cpu-gib {args.cpu_gib} "
        f"--export-read-size-mib {args.export_read_size_mib} --export-read-write-mib {args.export_read_write_mib}`. "
        "A bigger run: `make bench BENCH_ARGS='--rounds 5 --runtime 30 --nbd-size-mib 4096'`.",
    ]
    rep.parts = targets_table(rep, args) + rep.parts
    history = os.path.join(os.path.dirname(os.path.abspath(__file__)), "history.md")
    notes = ["", open(history).read()] if os.path.exists(history) else []
    tail = notes + ["", "## Commands", "", "Every command the run executed (URIs and paths abbreviated):", "", "```"] + rep.commands + ["```", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(head) + "\n" + "\n".join(rep.parts) + "\n".join(tail))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
