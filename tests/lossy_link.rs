//! A lossy link (issue 4): a UDP proxy on loopback between the agent and the replica drops 5 %
//! of the datagrams, duplicates some, delays each by a random few milliseconds (which reorders
//! them), and cuts the link completely for a few seconds. (At 5 % loss QUIC's congestion
//! control keeps the throughput near 1 MB/s, so the volume is small.) Writes go on throughout; at the end
//! the replica's `latest` equals the device, and every acknowledged bookmark restores exactly.
//!
//! Loss the link makes itself: both binaries size their UDP socket's kernel buffers
//! ([`cdp_shared::identity::UDP_BUFFER_BYTES`]), checked from outside with `ss`.

mod common;

use std::collections::BinaryHeap;
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

/// A datagram and when to deliver it (the `u64` keeps equal times in arrival order).
type Scheduled = std::cmp::Reverse<(Instant, u64, Vec<u8>)>;

/// Datagrams waiting for their delivery time.
struct Queue {
    heap: Mutex<BinaryHeap<Scheduled>>,
    ready: Condvar,
}

struct Proxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    cut: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on 127.0.0.1 (for the agent) and forwards to `replica`.
    fn start(replica: SocketAddr, seed: u64) -> Proxy {
        let front = UdpSocket::bind("127.0.0.1:0").expect("bind the front");
        let back = UdpSocket::bind("127.0.0.1:0").expect("bind the back");
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
        }
        let addr = front.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let agent: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let front = Arc::new(front);
        let back = Arc::new(back);
        let mut threads = Vec::new();
        for dir in 0..2u64 {
            let queue = Arc::new(Queue {
                heap: Mutex::new(BinaryHeap::new()),
                ready: Condvar::new(),
            });
            // Receiver: applies the faults and schedules what survives.
            let (rx, stop1, cut1, dropped1, agent1, q1) = (
                if dir == 0 {
                    front.clone()
                } else {
                    back.clone()
                },
                stop.clone(),
                cut.clone(),
                dropped.clone(),
                agent.clone(),
                queue.clone(),
            );
            threads.push(std::thread::spawn(move || {
                let mut rng = Lcg(seed ^ (dir + 1));
                let mut buf = vec![0u8; 65536];
                let mut n_seq = 0u64;
                while !stop1.load(Ordering::Relaxed) {
                    let Ok((n, from)) = rx.recv_from(&mut buf) else {
                        continue;
                    };
                    if dir == 0 {
                        *agent1.lock().expect("lock") = Some(from);
                    }
                    if cut1.load(Ordering::Relaxed) || rng.below(100) < 5 {
                        dropped1.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let copies = if rng.below(100) < 2 { 2 } else { 1 };
                    let mut heap = q1.heap.lock().expect("lock");
                    for _ in 0..copies {
                        let due = Instant::now() + Duration::from_micros(rng.below(4000));
                        n_seq += 1;
                        heap.push(std::cmp::Reverse((due, n_seq, buf[..n].to_vec())));
                    }
                    q1.ready.notify_one();
                }
            }));
            // Sender: delivers each datagram at its time (the random delays reorder them).
            let (tx, stop2, agent2, q2) = (
                if dir == 0 {
                    back.clone()
                } else {
                    front.clone()
                },
                stop.clone(),
                agent.clone(),
                queue,
            );
            threads.push(std::thread::spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    let mut heap = q2.heap.lock().expect("lock");
                    let wait = match heap.peek() {
                        Some(std::cmp::Reverse((due, _, _))) => {
                            due.saturating_duration_since(Instant::now())
                        }
                        None => Duration::from_millis(50),
                    };
                    if !wait.is_zero() {
                        let _ = q2.ready.wait_timeout(heap, wait).expect("wait");
                        continue;
                    }
                    let Some(std::cmp::Reverse((_, _, packet))) = heap.pop() else {
                        continue;
                    };
                    drop(heap);
                    let to = if dir == 0 {
                        Some(replica)
                    } else {
                        *agent2.lock().expect("lock")
                    };
                    if let Some(to) = to {
                        let _ = tx.send_to(&packet, to);
                    }
                }
            }));
        }
        Proxy {
            addr,
            stop,
            cut,
            dropped,
            threads,
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[test]
fn a_lossy_link_that_also_goes_down_loses_nothing() {
    if !require_python_nbd() {
        return;
    }
    let seed = std::env::var("CDP_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    eprintln!("seed: {seed}");
    let mut c = Cluster::new();
    let replica: SocketAddr = format!("127.0.0.1:{}", c.port).parse().expect("addr");
    let proxy = Proxy::start(replica, seed);
    c.set_agent_config("replica", &format!("\"{}\"", proxy.addr));
    let dev = c.make_device("v.img", 8 * MIB, 2 * MIB, seed);
    c.protect("v", &dev, None);
    c.start_replica();
    c.start_agent();
    c.wait_protecting("v", Duration::from_secs(180));
    let mut model = read_file(&dev);
    let mut nbd = NbdDriver::connect(&c.nbd_uri("v"));
    let mut rng = Lcg(seed);
    let mut marks = Vec::new();
    let mut buf = Vec::new();
    for round in 0..6 {
        if round == 3 {
            // The link goes away for a few seconds while writes go on.
            proxy.cut.store(true, Ordering::Relaxed);
        }
        for _ in 0..40 {
            let len = (1 + rng.below(16)) * 4096;
            let offset = rng.below(8 * MIB - len);
            buf.resize(len as usize, 0);
            rng.fill(&mut buf);
            nbd.write(offset, &buf, false)
                .expect("a write never fails because of the link");
            model[offset as usize..(offset + len) as usize].copy_from_slice(&buf);
        }
        nbd.flush().expect("flush");
        if round == 3 {
            std::thread::sleep(Duration::from_secs(3)); // the length of the cut (a fault, not a wait)
            proxy.cut.store(false, Ordering::Relaxed);
        }
        let name = format!("r{round}");
        let seq = c.bookmark(&name, round != 3);
        marks.push((name, seq, *blake3::hash(&model).as_bytes()));
    }
    c.wait_in_step("v", Duration::from_secs(180));
    assert!(
        proxy.dropped.load(Ordering::Relaxed) > 0,
        "the proxy dropped datagrams"
    );
    assert_same_image("the device", &read_file(&dev), &model);
    let latest = c.restore("v", "latest").expect("restore latest");
    assert_same_image("latest through a lossy link", &latest, &model);
    for (name, seq, h) in &marks {
        let got = c
            .restore("v", &format!("bookmark:{name}"))
            .expect("restore");
        assert_eq!(
            *blake3::hash(&got).as_bytes(),
            *h,
            "bookmark {name} (seq {seq})"
        );
    }
}

/// `ss -u -a -m -n -p`'s (rb, tb) of every UDP socket of process `pid`.
fn udp_buffers_of(pid: u32) -> Vec<(u64, u64)> {
    let out = run_ok(Command::new("ss").args(["-u", "-a", "-m", "-n", "-p"]));
    let mut found = Vec::new();
    let mut lines = out.lines();
    while let Some(line) = lines.next() {
        if !line.contains(&format!("pid={pid},")) {
            continue;
        }
        let skmem = lines.next().unwrap_or_default();
        let field = |name: &str| {
            skmem
                .split(['(', ',', ')'])
                .find_map(|f| f.trim().strip_prefix(name)?.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {name} in {skmem:?}"))
        };
        found.push((field("rb"), field("tb")));
    }
    found
}

#[test]
fn both_ends_of_the_link_size_their_udp_buffers() {
    if !require_tool("ss") {
        return;
    }
    let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").expect("/proc"));
    if uid != 0 {
        assert!(!in_ci(), "CI runs as root");
        println!("skipped: not root, so the buffers are capped by net.core.rmem_max");
        return;
    }
    let mut c = Cluster::new();
    let dev = c.make_device("v.img", 8 * MIB, MIB, 1);
    c.protect("v", &dev, None);
    c.start_replica();
    c.start_agent();
    c.wait_protecting("v", Duration::from_secs(120));
    // The kernel reports twice what was asked for (its bookkeeping).
    let want = 2 * cdp_shared::identity::UDP_BUFFER_BYTES as u64;
    for (name, proc) in [("replica", &c.replica), ("agent", &c.agent)] {
        let pid = proc.as_ref().expect("running").child.id();
        let sockets = udp_buffers_of(pid);
        assert!(!sockets.is_empty(), "the {name} has a UDP socket");
        for (rb, tb) in sockets {
            assert!(
                rb >= want && tb >= want,
                "{name}: rb {rb}, tb {tb}, want {want}"
            );
        }
    }
}
