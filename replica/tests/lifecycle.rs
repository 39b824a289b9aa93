//! The replica's lifecycle commands, on the real binary: `authorize` (its refusals), `agents`
//! (last seen, groups), `deauthorize` (closing a live connection of a streaming agent, and
//! refusing it afterwards).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use cdp_shared::batch::BatchFlags;
use cdp_shared::identity::{Fingerprint, Identity};
use cdp_shared::types::{CHUNK_BYTES, Seq};
use common::cli::*;
use common::export::NbdProc;
use common::serve::{Serve, log_tail};
use common::*;

/// `init` on `data`; returns the replica's fingerprint.
fn init(data: &Path) -> Fingerprint {
    let out = ok(&["init", "--data", data.to_str().expect("path")]);
    out.trim()
        .strip_prefix("fingerprint: ")
        .unwrap_or_else(|| panic!("init printed {out:?}"))
        .parse()
        .expect("hex fingerprint")
}

/// Authorizes a new agent identity under `name`.
fn new_agent(data: &Path, name: &str) -> Identity {
    let id = Identity::generate(name).expect("identity");
    ok(&[
        "authorize",
        "--data",
        data.to_str().expect("path"),
        "--agent",
        &id.fingerprint().to_string(),
        "--name",
        name,
    ]);
    id
}

/// Connects `identity`, says hello for `sim`'s group and syncs its volume; returns the agent.
async fn protect(
    identity: &Identity,
    replica: Fingerprint,
    serve: &Serve,
    sim: &mut AgentSim,
) -> QuicAgent {
    let mut q = QuicAgent::connect(identity, replica, serve.addr)
        .await
        .expect("connect");
    q.hello(vec![sim.hello()]).await.expect("welcome");
    let mut batches = Vec::new();
    sim.sync_volume(0, &mut batches);
    for (_, b) in &batches {
        q.send_batch(b).await.expect("send");
    }
    q.wait_ack(&sim.group, sim.seq).await;
    q
}

/// The agent of `agents --json` with this name.
fn listed(d: &str, name: &str) -> Option<serde_json::Value> {
    json(&["agents", "--data", d, "--json"])
        .as_array()
        .expect("array")
        .iter()
        .find(|a| a["name"] == name)
        .cloned()
}

/// `authorize` refuses the replica's own fingerprint and malformed ones (naming the problem),
/// changing nothing; `agents` lists the authorized agents with when they were last seen and
/// their groups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_refuses_bad_fingerprints_and_agents_lists_them() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("replica");
    let d = data.to_str().expect("path");
    let replica_fp = init(&data);
    let agents_file = data.join("authorized_agents.toml");
    let before = std::fs::read_to_string(&agents_file).expect("agents file");

    fails(
        &["authorize", "--data", d, "--agent", &replica_fp.to_string()],
        "is this replica's own fingerprint",
    );
    fails(
        &["authorize", "--data", d, "--agent", "abc"],
        "\"abc\" is not a certificate fingerprint: it has 3 characters",
    );
    let bad = format!("{}zz", &replica_fp.to_string()[..62]);
    fails(
        &["authorize", "--data", d, "--agent", &bad],
        "non-hexadecimal character near position 63",
    );
    assert_eq!(
        std::fs::read_to_string(&agents_file).expect("agents file"),
        before,
        "a refused authorize changes nothing"
    );
    assert!(ok(&["agents", "--data", d]).contains("no authorized agents"));

    let web = new_agent(&data, "web1");
    let idle = new_agent(&data, "idle");
    let a = listed(d, "web1").expect("listed");
    assert_eq!(a["fingerprint"], web.fingerprint().to_string());
    assert_eq!(a["last_seen"], serde_json::Value::Null);
    assert_eq!(a["connected"], false);
    assert_eq!(a["groups"], serde_json::json!([]));

    let serve = Serve::start(&data);
    let mut sim = AgentSim::new("web", &[(0, "web-disk", CHUNK_BYTES)]);
    let before_hello = chrono::Utc::now() - chrono::Duration::seconds(1);
    let q = protect(&web, replica_fp, &serve, &mut sim).await;
    let a = listed(d, "web1").expect("listed");
    assert_eq!(a["connected"], true);
    assert_eq!(a["groups"], serde_json::json!(["web"]));
    let seen = chrono::DateTime::parse_from_rfc3339(a["last_seen"].as_str().expect("a time"))
        .expect("RFC 3339");
    assert!(seen >= before_hello, "last seen {seen} is its hello");
    assert!(
        a["last_address"]
            .as_str()
            .expect("address")
            .starts_with("127.0.0.1:")
    );
    let table = ok(&["agents", "--data", d]);
    assert!(
        table.contains("web1") && table.contains("idle") && table.contains("never"),
        "{table}"
    );
    assert_eq!(
        listed(d, "idle").expect("listed")["groups"],
        serde_json::json!([])
    );
    drop(idle);

    // The end of the connection is when it was last seen.
    let hello_seen = seen;
    q.conn.close(0u32.into(), b"done");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let a = listed(d, "web1").expect("listed");
        let seen = chrono::DateTime::parse_from_rfc3339(a["last_seen"].as_str().expect("time"))
            .expect("RFC 3339");
        if a["connected"] == false && seen > hello_seen {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the disconnect was not recorded: {a}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    serve.stop();
}

/// A deauthorized agent that is connected and streaming batches is disconnected within a
/// deadline (with a reason that says so, and one line in serve's log naming it), is refused
/// when it connects again, and the other agent's connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deauthorize_closes_the_live_connection_of_a_streaming_agent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("replica");
    let d = data.to_str().expect("path");
    let replica_fp = init(&data);
    let web = new_agent(&data, "web1");
    let db = new_agent(&data, "db1");
    let log = tmp.path().join("serve.log");
    let mut serve = Serve::spawn(&data, "127.0.0.1:0", &log, &[]);
    serve.wait_listening();

    let mut web_sim = AgentSim::new("web", &[(0, "web-disk", 2 * CHUNK_BYTES)]);
    let mut db_sim = AgentSim::new("db", &[(0, "db-disk", CHUNK_BYTES)]);
    let web_q = protect(&web, replica_fp, &serve, &mut web_sim).await;
    let mut db_q = protect(&db, replica_fp, &serve, &mut db_sim).await;
    let web_conn = web_q.conn.clone();

    // The web agent streams batches, waiting for each ack, until its connection breaks.
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let streamer = {
        let acked = acked.clone();
        let mut q = web_q;
        tokio::spawn(async move {
            let mut i = 0u64;
            loop {
                i += 1;
                let (seq, b) = web_sim.batch(
                    &[Op::Data {
                        vol: 0,
                        offset: (i % 64) * 4096,
                        bytes: pattern(i, 4096),
                    }],
                    BatchFlags::FLUSH,
                    None,
                );
                if let Err(e) = q.send_batch(&b).await {
                    return e;
                }
                if let Err(e) = q.try_wait_ack("web", seq).await {
                    return e;
                }
                acked.store(seq, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    let deadline = Instant::now() + DEADLINE;
    while acked.load(std::sync::atomic::Ordering::SeqCst) < 20 {
        assert!(Instant::now() < deadline, "the agent does not stream");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(listed(d, "web1").expect("listed")["connected"], true);

    // Unknown and ambiguous agents are refused, changing nothing.
    let agents_file = data.join("authorized_agents.toml");
    let before = std::fs::read_to_string(&agents_file).expect("agents file");
    fails(
        &["deauthorize", "--data", d, "--agent", "mail1"],
        "no authorized agent is named \"mail1\"",
    );
    fails(
        &[
            "deauthorize",
            "--data",
            d,
            "--agent",
            &Fingerprint([5; 32]).to_string(),
        ],
        "no authorized agent has the fingerprint",
    );
    let twin = Identity::generate("twin").expect("identity");
    for id in [&twin, &Identity::generate("twin2").expect("identity")] {
        ok(&[
            "authorize",
            "--data",
            d,
            "--agent",
            &id.fingerprint().to_string(),
            "--name",
            "twin",
        ]);
    }
    let with_twins = std::fs::read_to_string(&agents_file).expect("agents file");
    fails(
        &["deauthorize", "--data", d, "--agent", "twin"],
        "2 authorized agents are named \"twin\"",
    );
    assert_eq!(
        std::fs::read_to_string(&agents_file).expect("agents file"),
        with_twins
    );
    assert_ne!(before, with_twins);

    // Deauthorized by name while it streams: closed within the deadline.
    let started = Instant::now();
    let out = ok(&["deauthorize", "--data", d, "--agent", "web1"]);
    assert!(
        out.contains(&web.fingerprint().to_string()) && out.contains("(web1)"),
        "{out}"
    );
    let closed = tokio::time::timeout(Duration::from_secs(5), web_conn.closed())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the connection of the deauthorized agent is still open after 5 s; serve's log:\n{}",
                log_tail(&log)
            )
        });
    let took = started.elapsed();
    match &closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(u64::from(c.error_code), 3, "{c:?}");
            let reason = String::from_utf8_lossy(&c.reason);
            assert!(
                reason.contains("deauthorized") && reason.contains(&web.fingerprint().to_string()),
                "{reason}"
            );
        }
        other => panic!("closed otherwise: {other:?}"),
    }
    assert!(took < Duration::from_secs(3), "closed only after {took:?}");
    let streamed_until = acked.load(std::sync::atomic::Ordering::SeqCst);
    let e = tokio::time::timeout(DEADLINE, streamer)
        .await
        .expect("the streamer stops")
        .expect("streamer task");
    assert!(!e.is_empty());

    // A new connection is refused (at the handshake), and nothing more is acknowledged.
    let refused = match QuicAgent::connect(&web, replica_fp, serve.addr).await {
        Err(_) => true,
        Ok(mut q) => q
            .hello(vec![AgentSim::new("web", &[]).hello()])
            .await
            .is_err(),
    };
    assert!(refused, "a deauthorized agent was served again");
    let web_status = || {
        json(&["status", "--data", d, "--json"])["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["volume"] == "web-disk")
            .cloned()
            .expect("web-disk stays")
    };
    let deadline = Instant::now() + DEADLINE;
    while web_status()["connected"] != false {
        assert!(Instant::now() < deadline, "the link stays up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // At most the batch in flight when the connection closed was committed after the last ack.
    let head = web_status()["head_seq"].as_u64().expect("head");
    assert!(
        (streamed_until..=streamed_until + 1).contains(&head),
        "head {head}, last ack {streamed_until}"
    );

    // One line in serve's log names the agent; it is no longer listed; again: unknown.
    let text = std::fs::read_to_string(&log).expect("log");
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("closing the connection of agent \"web1\""))
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(
        lines[0].contains(&web.fingerprint().to_string()),
        "{}",
        lines[0]
    );
    assert!(listed(d, "web1").is_none());
    fails(
        &[
            "deauthorize",
            "--data",
            d,
            "--agent",
            &web.fingerprint().to_string(),
        ],
        "no authorized agent has the fingerprint",
    );

    // The other agent's connection goes on.
    let (seq, b) = db_sim.batch(
        &[Op::Data {
            vol: 0,
            offset: 0,
            bytes: pattern(99, 4096),
        }],
        BatchFlags::FLUSH,
        None,
    );
    db_q.send_batch(&b).await.expect("send");
    db_q.wait_ack("db", seq).await;
    assert_eq!(listed(d, "db1").expect("listed")["connected"], true);
    serve.stop();
}

/// Points in a catalog made directly: `n` batches of group `group` (volume `volume` of 1 MiB,
/// protecting from seq 1), one a second ending one minute ago, a bookmark every 1000th.
/// Returns the agent time of each seq (index = seq).
async fn many_points(data: &Path, group: &str, volume: &str, n: u64) -> Vec<i64> {
    points_in_catalog(data, group, volume, n, None).await
}

/// [`many_points`], each batch journaled with `journaled` bytes when given (rows only: no
/// segment file holds them, so no `serve` may start on such a directory).
async fn points_in_catalog(
    data: &Path,
    group: &str,
    volume: &str,
    n: u64,
    journaled: Option<u64>,
) -> Vec<i64> {
    use cdp_replica::catalog::{BatchRow, Catalog, CommitRows, OpenMode, VolumeState};
    use cdp_replica::journal::SegmentSpan;
    let catalog = Catalog::open(&data.join("meta.db"), OpenMode::Existing)
        .await
        .expect("catalog");
    let g = catalog
        .create_group(
            group,
            "owner",
            "gen",
            Seq(0),
            &cdp_replica::Retention::default(),
            0,
        )
        .await
        .expect("group");
    let v = catalog
        .insert_volume(g.id, 0, volume, CHUNK_BYTES)
        .await
        .expect("volume");
    let last = chrono::Utc::now().timestamp_nanos_opt().expect("now") - 60_000_000_000;
    let times: Vec<i64> = (0..=n)
        .map(|seq| last - (n - seq) as i64 * 1_000_000_000)
        .collect();
    let batches = (1..=n)
        .map(|seq| BatchRow {
            seq: Seq(seq),
            agent_ns: times[seq as usize],
            received_ns: times[seq as usize] + 1000,
            durable_ns: times[seq as usize] + 2000,
            flags: BatchFlags::FLUSH,
            bookmark: seq.is_multiple_of(1000).then(|| format!("bm-{seq}")),
            span: journaled.map(|length| SegmentSpan {
                segment: 1,
                position: 16 + (seq - 1) * length,
                length,
            }),
            record_count: 1,
            header_hash: [7; 32],
        })
        .collect();
    catalog
        .commit(&CommitRows {
            group_id: g.id,
            head_seq: Seq(n),
            batches,
            volume_changes: vec![(v.id, VolumeState::Protecting, Some(Seq(1)))],
            ..CommitRows::default()
        })
        .await
        .expect("commit");
    catalog.close().await;
    times
}

fn rfc(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn seqs(points: &serde_json::Value) -> Vec<u64> {
    points
        .as_array()
        .expect("array")
        .iter()
        .map(|p| p["seq"].as_u64().expect("seq"))
        .collect()
}

/// `points --since/--until/--limit/--bookmarks` on a window of 300,000 points: the same
/// objects as the whole listing, newest first with a limit, and a limited listing costs a
/// small fraction of the whole one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_are_filtered_and_limited_in_a_large_window() {
    const N: u64 = 300_000;
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("replica");
    let d = data.to_str().expect("path");
    init(&data);
    let times = many_points(&data, "big", "big-disk", N).await;
    let base = ["points", "--data", d, "--volume", "big-disk", "--json"];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        json(&a)
    };

    let started = Instant::now();
    let all = json(&base);
    let whole = started.elapsed();
    assert_eq!(all.as_array().expect("array").len() as u64, N);
    let started = Instant::now();
    let last20 = with(&["--limit", "20"]);
    let limited = started.elapsed();
    assert_eq!(seqs(&last20), (N - 19..=N).rev().collect::<Vec<_>>());
    // The same objects as the whole listing.
    assert_eq!(last20[0], all[(N - 1) as usize]);
    assert_eq!(last20[19], all[(N - 20) as usize]);
    eprintln!("{N} points listed in {whole:?}, 20 of them in {limited:?}");
    assert!(
        limited * 4 < whole,
        "20 of {N} points took {limited:?}, all of them {whole:?}"
    );

    // A time range (both ends included), oldest first without a limit.
    let (a, b) = (1000usize, 1010usize);
    assert_eq!(
        seqs(&with(&[
            "--since",
            &rfc(times[a]),
            "--until",
            &rfc(times[b])
        ])),
        (a as u64..=b as u64).collect::<Vec<_>>()
    );
    // With a limit: the newest of the range.
    assert_eq!(
        seqs(&with(&["--until", &rfc(times[b]), "--limit", "3"])),
        [b as u64, b as u64 - 1, b as u64 - 2]
    );
    // Bookmarks only.
    let bms = with(&["--bookmarks", "--limit", "2"]);
    assert_eq!(seqs(&bms), [N, N - 1000]);
    assert_eq!(bms[0]["bookmark"], format!("bm-{N}"));
    assert_eq!(
        seqs(&with(&["--bookmarks", "--until", &rfc(times[3500])])),
        [1000, 2000, 3000]
    );
    // A duration ago: the points of the last 30 minutes, counted back from when the command
    // ran (the newest is 1 minute old, one a second).
    let since_now = |now: i64| {
        let cutoff = now - 30 * 60 * 1_000_000_000;
        times[1..].iter().filter(|&&t| t >= cutoff).count()
    };
    let before = since_now(chrono::Utc::now().timestamp_nanos_opt().expect("now"));
    let recent = seqs(&with(&["--since", "30m"]));
    let after = since_now(chrono::Utc::now().timestamp_nanos_opt().expect("now"));
    assert!(
        (after..=before).contains(&recent.len()) && recent.last() == Some(&N),
        "{} points in the last 30 minutes, not {after}..={before}",
        recent.len()
    );
    assert_eq!(
        with(&["--since", "1m", "--until", "1h"]),
        serde_json::json!([])
    );
    assert!(
        ok(&[
            "points", "--data", d, "--volume", "big-disk", "--since", "10s"
        ])
        .contains("no recovery point matches")
    );
    let table = ok(&[
        "points", "--data", d, "--volume", "big-disk", "--limit", "2",
    ]);
    assert!(
        table.contains(&N.to_string()) && table.contains("bm-300000"),
        "{table}"
    );

    fails(
        &[
            "points", "--data", d, "--volume", "big-disk", "--limit", "0",
        ],
        "--limit 0",
    );
    fails(
        &[
            "points",
            "--data",
            d,
            "--volume",
            "big-disk",
            "--since",
            "yesterday",
        ],
        "--since \"yesterday\" is neither an RFC 3339 time",
    );
    fails(
        &[
            "points", "--data", d, "--volume", "big-disk", "--until", "5x",
        ],
        "--until \"5x\" is neither",
    );
}

/// `retention` refuses a change that would drop points unless `--yes` is given, saying how many
/// and which span of agent time, changing nothing; with `--yes` it applies, and the trimmer of
/// a `serve` then drops exactly the points it said. A change that drops nothing applies as
/// before. The journal cap is reckoned the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_that_drops_points_needs_yes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("replica");
    let d = data.to_str().expect("path");
    init(&data);
    let times = many_points(&data, "ret", "ret-disk", 100).await;
    let retention = |args: &[&str]| {
        let mut a = vec!["retention", "--data", d, "--group", "ret"];
        a.extend_from_slice(args);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run_ret = |args: &[&str]| {
        let a = retention(args);
        ok(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let fail_ret = |args: &[&str], needle: &str| {
        let a = retention(args);
        fails(&a.iter().map(String::as_str).collect::<Vec<_>>(), needle)
    };

    // The head is 60 s old and batches are 1 s apart: a 30 s window keeps seq 69 (the newest
    // older than the window) on, and drops seqs 1 to 68: 68 s of agent time.
    let (_, err) = fail_ret(
        &["--window", "30s"],
        "changing group ret to window 30s, journal cap none would drop 68 points (seq 1 to 68, 1m 8s of agent time from ",
    );
    assert!(
        err.contains(&rfc_secs(times[1]))
            && err.contains("nothing was changed")
            && err.contains("--yes"),
        "{err}"
    );
    assert_eq!(
        run_ret(&[]).trim(),
        "group ret: window 24h, journal cap none"
    );
    // A change that drops nothing applies without --yes, and says nothing more.
    assert_eq!(
        run_ret(&["--window", "48h"]).trim(),
        "group ret: window 2d, journal cap none"
    );
    assert_eq!(
        run_ret(&["--window", "2m", "--max-journal", "1GiB"]).trim(),
        "group ret: window 2m, journal cap 1GiB"
    );
    // Dropping what the current retention keeps counts from there: 2m keeps everything here.
    fail_ret(&["--window", "30s"], "would drop 68 points (seq 1 to 68,");
    let out = run_ret(&["--window", "30s", "--yes"]);
    assert!(
        out.starts_with("group ret: window 30s, journal cap 1GiB\n")
            && out.contains("the trimmer drops 68 points (seq 1 to 68"),
        "{out}"
    );

    // serve's trimmer drops exactly those.
    let serve = Serve::start(&data);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let points = json(&["points", "--data", d, "--volume", "ret-disk", "--json"]);
        if seqs(&points).first() == Some(&69) {
            assert_eq!(seqs(&points), (69..=100).collect::<Vec<_>>());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not trimmed to 69: {:?}",
            seqs(&points).first()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing left to drop at 30s; a shorter window drops what it says.
    assert_eq!(
        run_ret(&["--window", "30s"]).trim(),
        "group ret: window 30s, journal cap 1GiB"
    );
    fail_ret(
        &["--window", "10s"],
        "would drop 20 points (seq 69 to 88, 20s of agent time",
    );
    serve.stop();

    // The journal cap: 100 batches of 1 MiB under a 10 MiB cap keep seq 90 on (the batches
    // after it hold 10 MiB).
    let capped = tmp.path().join("capped");
    let c = capped.to_str().expect("path");
    init(&capped);
    points_in_catalog(&capped, "cap", "cap-disk", 100, Some(1 << 20)).await;
    fails(
        &[
            "retention",
            "--data",
            c,
            "--group",
            "cap",
            "--max-journal",
            "10MiB",
        ],
        "changing group cap to window 24h, journal cap 10MiB would drop 89 points (seq 1 to 89,",
    );
    fails(
        &[
            "retention",
            "--data",
            c,
            "--group",
            "cap",
            "--max-journal",
            "50MiB",
        ],
        "would drop 49 points (seq 1 to 49,",
    );
    let out = ok(&[
        "retention",
        "--data",
        c,
        "--group",
        "cap",
        "--max-journal",
        "10MiB",
        "--yes",
    ]);
    assert!(out.contains("the trimmer drops 89 points"), "{out}");
    assert_eq!(
        ok(&["retention", "--data", c, "--group", "cap"]).trim(),
        "group cap: window 24h, journal cap 10MiB"
    );
}

/// An agent time as `retention` prints it (RFC 3339, UTC).
fn rfc_secs(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// The volume's `window_short` in `status --json`.
fn window_short(d: &str, volume: &str) -> serde_json::Value {
    json(&["status", "--data", d, "--json"])["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["volume"] == volume)
        .map(|v| v["window_short"].clone())
        .expect("the volume")
}

/// `status` warns when the journal cap, not the group's youth, keeps the window shorter than
/// the group's window; not for a young group whose window is short because it is young.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_warns_when_the_journal_cap_shortens_the_window() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("replica");
    let d = data.to_str().expect("path");
    let replica_fp = init(&data);
    let agent = new_agent(&data, "web1");
    let log = tmp.path().join("serve.log");
    set_segment_size(&data, "1MiB");
    let mut serve = Serve::spawn(&data, "127.0.0.1:0", &log, &[]);
    serve.wait_listening();
    let mut sim = AgentSim::new("web", &[(0, "web-disk", 4 * CHUNK_BYTES)]);
    sim.keep_history = false;
    let mut q = protect(&agent, replica_fp, &serve, &mut sim).await;
    // About 12 MiB of journal over 24 s of agent time (one batch a second).
    for i in 0..24u64 {
        let (_, b) = sim.batch(
            &[Op::Data {
                vol: 0,
                offset: (i % 8) * (512 << 10),
                bytes: pattern(3 * i + 1, 512 << 10),
            }],
            BatchFlags::FLUSH,
            None,
        );
        q.send_batch(&b).await.expect("send");
    }
    q.wait_ack("web", sim.seq).await;
    // Young: its 24 s are shorter than its 24 h, and nothing was trimmed.
    assert_eq!(window_short(d, "web-disk"), serde_json::Value::Null);

    ok(&[
        "retention",
        "--data",
        d,
        "--group",
        "web",
        "--max-journal",
        "2MiB",
        "--yes",
    ]);
    let deadline = Instant::now() + DEADLINE;
    let w = loop {
        let w = window_short(d, "web-disk");
        if !w.is_null() {
            break w;
        }
        assert!(
            Instant::now() < deadline,
            "no window_short; serve's log:\n{}",
            log_tail(&log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(w["configured_secs"], 86400);
    let effective = w["effective_secs"].as_u64().expect("secs");
    assert!((1..=8).contains(&effective), "{w}");
    let reason = w["reason"].as_str().expect("reason");
    assert!(
        reason.contains("volume web-disk spans")
            && reason.contains("not the 24h group web keeps")
            && reason.contains("journal cap of 2MiB")
            && reason.contains("--max-journal"),
        "{reason}"
    );
    let table = ok(&["status", "--data", d]);
    assert!(
        table.contains("volume web-disk: WINDOW SHORT: the window of volume web-disk spans"),
        "{table}"
    );
    let v = json(&["status", "--data", d, "--json"])["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["volume"] == "web-disk")
        .cloned()
        .expect("the volume");
    assert!(
        v["causes"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c == "history-short")),
        "the short window is a named cause: {v}"
    );
    assert!(table.contains("history-short"), "{table}");
    // Without a cap the window grows back; until it does, the warning says why it is short.
    ok(&[
        "retention",
        "--data",
        d,
        "--group",
        "web",
        "--max-journal",
        "none",
    ]);
    let w = window_short(d, "web-disk");
    assert!(
        w["reason"]
            .as_str()
            .expect("reason")
            .contains("earlier, smaller retention"),
        "{w}"
    );
    q.conn.close(0u32.into(), b"done");
    serve.stop();
}

/// `cdp-replica export` of the latest point on `socket`, up once it printed its line.
fn start_export(data: &Path, volume: &str, socket: &Path) -> NbdProc {
    let export = NbdProc::export(replica_bin(), data, volume, "latest", Some(socket), false);
    assert!(
        export.line.contains("export of volume"),
        "export: {:?}",
        export.line
    );
    export
}

/// Sends `n` data batches (one with bookmark `bm`) and waits for their acks.
async fn write_some(q: &mut QuicAgent, sim: &mut AgentSim, vol: u32, n: u64, seed: u64) {
    for i in 0..n {
        let (_, b) = sim.batch(
            &[Op::Data {
                vol,
                offset: (i % 16) * 8192,
                bytes: pattern(seed * 1000 + 3 * i + 1, 8192),
            }],
            BatchFlags::FLUSH,
            (i == n / 2).then_some("bm"),
        );
        q.send_batch(&b).await.expect("send");
    }
    q.wait_ack(&sim.group, sim.seq).await;
}

fn volume_names(d: &str) -> Vec<String> {
    json(&["status", "--data", d, "--json"])["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| v["volume"].as_str().expect("name").to_owned())
        .collect()
}

/// Every catalog row that names group `gid` or volume `vid`, by table.
async fn rows_left(data: &Path, gid: i64, vid: i64) -> Vec<(String, u64)> {
    let catalog = cdp_replica::catalog::Catalog::open(
        &data.join("meta.db"),
        cdp_replica::catalog::OpenMode::Existing,
    )
    .await
    .expect("catalog");
    let mut left = Vec::new();
    for (table, column, id) in [
        ("groups", "id", gid),
        ("volumes", "id", vid),
        ("batches", "group_id", gid),
        ("bookmarks", "group_id", gid),
        ("links", "group_id", gid),
        ("pins", "group_id", gid),
        ("failovers", "group_id", gid),
        ("records", "volume_id", vid),
        ("verify_results", "volume_id", vid),
        ("verify_sweep", "volume_id", vid),
        ("verify_runs", "volume_id", vid),
    ] {
        let n = sql::count_rows(&data.join("meta.db"), table, column, id).await;
        if n > 0 {
            left.push((table.to_owned(), n));
        }
    }
    let events = catalog.events(Some("web"), 100).await.expect("events");
    if !events.is_empty() {
        left.push(("events".to_owned(), events.len() as u64));
    }
    catalog.close().await;
    left
}

/// (group id, volume id) of a volume.
async fn ids(data: &Path, volume: &str) -> (i64, i64) {
    let catalog = cdp_replica::catalog::Catalog::open(
        &data.join("meta.db"),
        cdp_replica::catalog::OpenMode::Existing,
    )
    .await
    .expect("catalog");
    let v = catalog
        .volume_by_name(volume)
        .await
        .expect("query")
        .expect("volume");
    catalog.close().await;
    (v.group_id, v.id)
}

/// `forget` while serve runs: refused while the group's agent is connected (naming it) and
/// while an export holds a point (naming it); without --yes it only says what it would delete;
/// with it, after the export stopped, the journal, the target file and every row are gone,
/// `status` and `points` no longer list the volume, another group is untouched, and the agent
/// that connects again finds a new group and syncs it afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_is_refused_while_held_and_then_deletes_everything() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("replica");
    let d = data.to_str().expect("path");
    let replica_fp = init(&data);
    let web = new_agent(&data, "web1");
    let db = new_agent(&data, "db1");
    let serve = Serve::start(&data);
    let mut web_sim = AgentSim::new("web", &[(0, "web-disk", 2 * CHUNK_BYTES)]);
    web_sim
        .images
        .insert(0, pattern(5, 2 * CHUNK_BYTES as usize));
    let mut db_sim = AgentSim::new("db", &[(0, "db-disk", CHUNK_BYTES)]);
    let mut wq = protect(&web, replica_fp, &serve, &mut web_sim).await;
    let mut dq = protect(&db, replica_fp, &serve, &mut db_sim).await;
    write_some(&mut wq, &mut web_sim, 0, 12, 1).await;
    write_some(&mut dq, &mut db_sim, 0, 5, 2).await;
    let (gid, vid) = ids(&data, "web-disk").await;
    let journal = data.join("journal").join("web");
    let target = data.join("volumes").join("web-disk").join("target");
    assert!(journal.is_dir() && target.is_file());
    let web_points = json(&["points", "--data", d, "--volume", "web-disk", "--json"])
        .as_array()
        .expect("points")
        .len();

    // Its agent is connected.
    fails(
        &["forget", "--data", d, "--group", "web", "--yes"],
        &format!(
            "group web is protected by agent \"web1\" ({}), which is connected to the running serve",
            web.fingerprint()
        ),
    );
    wq.conn.close(0u32.into(), b"bye");
    let deadline = Instant::now() + DEADLINE;
    while listed(d, "web1").expect("listed")["connected"] != false {
        assert!(Instant::now() < deadline, "the link stays up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // An export holds a point.
    let socket = tmp.path().join("web.sock");
    let export = start_export(&data, "web-disk", &socket);
    let (_, err) = fails(
        &["forget", "--data", d, "--volume", "web-disk", "--yes"],
        &format!(
            "group web is held by a reader: export on {} (pid {})",
            socket.display(),
            export.child.id()
        ),
    );
    assert!(err.contains("stop it or let it finish"), "{err}");
    assert!(journal.is_dir() && target.is_file());
    let _ = export.terminate();

    // Without --yes: what it would delete, and nothing deleted.
    let o = run(&["forget", "--data", d, "--volume", "web-disk"]);
    assert_eq!(o.status.code(), Some(1));
    let (out, err) = (stdout(&o), stderr(&o));
    assert!(
        out.contains(&format!(
            "forget would delete group web (agent {})",
            web.fingerprint()
        )) && out.contains("volume web-disk: target file of 2.0 MiB")
            && out.contains(&format!(", {web_points} points (seq "))
            && out.contains("journal: "),
        "{out}"
    );
    assert!(
        err.contains("error: nothing was deleted") && err.contains("--yes"),
        "{err}"
    );
    assert!(journal.is_dir() && target.is_file());
    assert_eq!(volume_names(d), ["db-disk", "web-disk"]);

    // With --yes (carried out by the running serve).
    let out = ok(&["forget", "--data", d, "--volume", "web-disk", "--yes"]);
    assert!(
        out.starts_with("forgot group web") && out.contains("fresh initial sync"),
        "{out}"
    );
    assert!(!journal.exists(), "the journal is left");
    assert!(!target.exists() && !target.parent().expect("dir").exists());
    assert_eq!(volume_names(d), ["db-disk"]);
    fails(
        &["points", "--data", d, "--volume", "web-disk"],
        "no volume named \"web-disk\"",
    );
    fails(
        &["retention", "--data", d, "--group", "web"],
        "no group named",
    );
    assert_eq!(
        rows_left(&data, gid, vid).await,
        Vec::<(String, u64)>::new()
    );
    assert_eq!(
        listed(d, "web1").expect("listed")["groups"],
        serde_json::json!([])
    );
    assert!(
        ok(&["forget", "--data", d, "--group", "web", "--yes"])
            .contains("group web was already forgotten")
    );

    // The other group goes on.
    write_some(&mut dq, &mut db_sim, 0, 3, 3).await;
    let db_points = json(&["points", "--data", d, "--volume", "db-disk", "--json"]);
    assert_eq!(seqs(&db_points).last(), Some(&db_sim.seq));

    // The agent connects again: the group is new (at seq 0), its volume new, synced afresh.
    let mut fresh = AgentSim::new("web", &[(0, "web-disk", 2 * CHUNK_BYTES)]);
    fresh.images.insert(0, pattern(6, 2 * CHUNK_BYTES as usize));
    fresh.history[0] = fresh.images.clone();
    let mut q = QuicAgent::connect(&web, replica_fp, serve.addr)
        .await
        .expect("connect");
    // Like the real agent, its spool starts well after seq 1.
    let mut hello = fresh.hello();
    hello.head = cdp_shared::types::Seq(web_sim.seq);
    hello.first_held = cdp_shared::types::Seq(web_sim.seq - 3);
    let welcome = q.hello(vec![hello]).await.expect("welcome");
    match welcome {
        cdp_shared::wire::Control::Welcome { groups, .. } => {
            assert_eq!(groups[0].durable.0, 0, "{groups:?}");
            assert_eq!(groups[0].volumes[0].state.as_str(), "new");
        }
        other => panic!("expected a welcome, got {other:?}"),
    }
    let mut batches = Vec::new();
    let synced = fresh.sync_volume(0, &mut batches);
    for (_, b) in &batches {
        q.send_batch(b).await.expect("send");
    }
    q.wait_ack("web", fresh.seq).await;
    let out = tmp.path().join("web-again.img");
    ok(&[
        "restore",
        "--data",
        d,
        "--volume",
        "web-disk",
        "--at",
        "latest",
        "--out",
        out.to_str().expect("path"),
    ]);
    assert!(
        read(&out) == fresh.image_at(synced, 0),
        "the new sync restores"
    );
    serve.stop();
}

/// `forget` with serve stopped: one volume of a group of two (its target and rows go, the
/// other volume and the group's journal stay and restore as before); a forget killed after
/// its transaction leaves no row and files that the next `forget` — or a `serve` start —
/// deletes; and a volume created again is synced afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_without_serve_is_crash_safe_and_forgets_one_volume_of_several() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("replica");
    let d = data.to_str().expect("path");
    let replica_fp = init(&data);
    let agent = new_agent(&data, "web1");
    let serve = Serve::start(&data);
    let mut sim = AgentSim::new(
        "pair",
        &[(0, "pair-a", CHUNK_BYTES), (1, "pair-b", CHUNK_BYTES)],
    );
    let mut q = QuicAgent::connect(&agent, replica_fp, serve.addr)
        .await
        .expect("connect");
    q.hello(vec![sim.hello()]).await.expect("welcome");
    let mut batches = Vec::new();
    sim.sync_volume(0, &mut batches);
    sim.sync_volume(1, &mut batches);
    for (_, b) in &batches {
        q.send_batch(b).await.expect("send");
    }
    write_some(&mut q, &mut sim, 0, 6, 1).await;
    write_some(&mut q, &mut sim, 1, 6, 2).await;
    let mut solo = AgentSim::new("solo", &[(0, "solo-disk", CHUNK_BYTES)]);
    let mut sq = protect(&agent, replica_fp, &serve, &mut solo).await;
    write_some(&mut sq, &mut solo, 0, 4, 3).await;
    q.conn.close(0u32.into(), b"bye");
    sq.conn.close(0u32.into(), b"bye");
    serve.stop();
    let head = sim.seq;
    let (gid, vid_b) = ids(&data, "pair-b").await;

    // One volume of two: its group and the other volume stay.
    let o = run(&["forget", "--data", d, "--volume", "pair-b"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("volume pair-b of group pair (the group and its volume pair-a stay)")
            && stdout(&o).contains("its records in the group's journal stay"),
        "{}",
        stdout(&o)
    );
    let out = ok(&["forget", "--data", d, "--volume", "pair-b", "--yes"]);
    assert!(
        out.starts_with("forgot volume pair-b of group pair"),
        "{out}"
    );
    assert!(!data.join("volumes").join("pair-b").exists());
    assert!(data.join("journal").join("pair").is_dir());
    assert_eq!(volume_names(d), ["pair-a", "solo-disk"]);
    let left = rows_left(&data, -1, vid_b).await;
    assert_eq!(left, Vec::<(String, u64)>::new(), "rows of pair-b left");
    let img = tmp.path().join("a.img");
    ok(&[
        "restore",
        "--data",
        d,
        "--volume",
        "pair-a",
        "--at",
        "latest",
        "--out",
        img.to_str().expect("path"),
    ]);
    assert!(
        read(&img) == sim.image_at(head, 0),
        "pair-a restores as before"
    );

    // Its agent connects again: pair-b is new (synced afresh), pair-a goes on.
    let serve = Serve::start(&data);
    let mut q = QuicAgent::connect(&agent, replica_fp, serve.addr)
        .await
        .expect("connect");
    match q.hello(vec![sim.hello()]).await.expect("welcome") {
        cdp_shared::wire::Control::Welcome { groups, .. } => {
            assert_eq!(groups[0].durable.0, head);
            let states: Vec<&str> = groups[0].volumes.iter().map(|v| v.state.as_str()).collect();
            assert_eq!(states, ["protecting", "new"]);
        }
        other => panic!("expected a welcome, got {other:?}"),
    }
    sim.images.insert(1, pattern(9, CHUNK_BYTES as usize));
    let mut batches = Vec::new();
    let synced_b = sim.sync_volume(1, &mut batches);
    for (_, b) in &batches {
        q.send_batch(b).await.expect("send");
    }
    write_some(&mut q, &mut sim, 0, 2, 4).await;
    let img = tmp.path().join("b.img");
    ok(&[
        "restore",
        "--data",
        d,
        "--volume",
        "pair-b",
        "--at",
        "latest",
        "--out",
        img.to_str().expect("path"),
    ]);
    assert!(read(&img) == sim.image_at(sim.seq, 1) && synced_b < sim.seq);
    q.conn.close(0u32.into(), b"bye");
    serve.stop();

    // Killed after its transaction: no row, the files still there and listed.
    forget_stopped_after_rows(&data, "solo").await;
    assert_eq!(volume_names(d), ["pair-a", "pair-b"]);
    let solo_journal = data.join("journal").join("solo");
    assert!(solo_journal.is_dir() && data.join("volumes").join("solo-disk").is_dir());
    // The next forget completes it.
    let out = ok(&["forget", "--data", d, "--group", "solo", "--yes"]);
    assert!(out.contains("group solo was already forgotten"), "{out}");
    assert!(!solo_journal.exists() && !data.join("volumes").join("solo-disk").exists());

    // Killed after its transaction again (the whole group), then serve starts: it deletes
    // the files before it admits the agent, and the group is new to it.
    forget_stopped_after_rows(&data, "pair").await;
    assert!(data.join("journal").join("pair").is_dir());
    let serve = Serve::start(&data);
    assert!(!data.join("journal").join("pair").exists());
    assert!(!data.join("volumes").join("pair-a").exists());
    assert!(!data.join("volumes").join("pair-b").exists());
    assert_eq!(rows_left(&data, gid, -1).await, Vec::<(String, u64)>::new());
    let mut fresh = AgentSim::new("pair", &[(0, "pair-a", CHUNK_BYTES)]);
    fresh.images.insert(0, pattern(8, CHUNK_BYTES as usize));
    fresh.history[0] = fresh.images.clone();
    let mut q = QuicAgent::connect(&agent, replica_fp, serve.addr)
        .await
        .expect("connect");
    match q.hello(vec![fresh.hello()]).await.expect("welcome") {
        cdp_shared::wire::Control::Welcome { groups, .. } => {
            assert_eq!(
                (groups[0].durable.0, groups[0].volumes[0].state.as_str()),
                (0, "new")
            )
        }
        other => panic!("expected a welcome, got {other:?}"),
    }
    let mut batches = Vec::new();
    let synced = fresh.sync_volume(0, &mut batches);
    for (_, b) in &batches {
        q.send_batch(b).await.expect("send");
    }
    q.wait_ack("pair", fresh.seq).await;
    let img = tmp.path().join("a2.img");
    ok(&[
        "restore",
        "--data",
        d,
        "--volume",
        "pair-a",
        "--at",
        "latest",
        "--out",
        img.to_str().expect("path"),
    ]);
    assert!(read(&img) == fresh.image_at(synced, 0));
    serve.stop();
}

/// A forget of group `name` that stops right after step 1 of its protocol (as if killed
/// there): the rows are gone, the files listed in `forget_files` and still there. Run as the
/// CLI runs it: with serve's lock taken (serve must not run).
async fn forget_stopped_after_rows(data: &Path, name: &str) {
    use cdp_replica::catalog::{Catalog, OpenMode};
    use cdp_replica::datadir::{DataDir, ServeLock};
    use cdp_replica::forget::{self, ForgetTarget};
    let dir = DataDir::existing(data).expect("data dir");
    let catalog = Catalog::open(&dir.catalog(), OpenMode::Existing)
        .await
        .expect("catalog");
    let _lock = ServeLock::acquire(&dir).expect("serve is not running");
    let plan = forget::plan(&catalog, &ForgetTarget::Group(name.into()))
        .await
        .expect("plan")
        .expect("the group is there");
    forget::delete_rows(&catalog, &dir, &plan)
        .await
        .expect("step 1");
    catalog.close().await;
}
