//! The replica's web console (issue 13, scope 4): `cdp-replica serve --http ADDR` serves one
//! self-contained page at `/` and its JSON API (`/api/status`, `/api/lag`, `/api/bookmarks`,
//! `/api/verify`, `/api/events`). The API is checked against `status --json`, a bookmark taken with the CLI
//! and the head reports; the page is rendered by a real browser (headless Chromium, its DOM
//! dumped after the page's scripts ran) and must show the volume with its cause, the lag
//! chart, the bookmark and the events, and follow the cause when the agent goes away. A
//! screenshot is kept in the target directory.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

/// `GET http://addr{path}`: (status line, body).
fn get(addr: &str, path: &str) -> (String, String) {
    let (head, body) = http_get(addr, path);
    (head.lines().next().unwrap_or("").to_owned(), body)
}

/// `GET` of a JSON API path that must answer 200.
fn api(addr: &str, path: &str) -> serde_json::Value {
    let (status, body) = get(addr, path);
    assert!(status.contains(" 200"), "GET {path}: {status}\n{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
}

/// Headless Chromium on `url` with `extra` arguments (virtual time lets the page's fetches
/// finish before it dumps or shoots).
fn chromium(url: &str, profile: &std::path::Path, extra: &[String]) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium {extra:?} {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The page at `url` as the browser has it once its scripts ran.
fn rendered(url: &str, profile: &std::path::Path) -> String {
    chromium(url, profile, &["--dump-dom".to_owned()])
}

#[test]
fn the_console_shows_volumes_causes_lag_bookmarks_and_events() {
    if !require_python_nbd() || !require_tool("chromium") {
        return;
    }
    let mut c = Cluster::new();
    let dev = c.make_device("v.img", 16 * MIB, 4 * MIB, test_seed());
    c.protect("v", &dev, None);
    let replica_toml = c.replica_dir.join("replica.toml");
    let text = std::fs::read_to_string(&replica_toml).expect("replica.toml");
    std::fs::write(&replica_toml, format!("http = \"127.0.0.1:0\"\n{text}")).expect("write");
    c.start_replica();
    c.start_agent();
    c.wait_protecting("v", Duration::from_secs(120));
    c.wait_caught_up("v", Duration::from_secs(60));
    let addr = address_in(
        &c.replica.as_ref().expect("replica").log_text(),
        "console on http://",
    )
    .expect("the replica prints its console address");

    // A write, then a bookmark through the CLI.
    let mut nbd = NbdDriver::connect(&c.nbd_uri("v"));
    let mut rng = Lcg(test_seed());
    let mut buf = vec![0u8; MIB as usize];
    rng.fill(&mut buf);
    nbd.write(0, &buf, false).expect("write");
    nbd.flush().expect("flush");
    drop(nbd);
    let mark = c.bookmark("before-upgrade", true);

    // The page: self-contained (no asset from elsewhere); unknown paths are 404.
    let (status, page) = get(&addr, "/");
    assert!(status.contains(" 200"), "{status}");
    assert!(page.contains("<title>cdp replica</title>"), "{page}");
    for external in [
        "src=\"http",
        "href=\"http",
        "src=\"//",
        "href=\"//",
        "@import",
    ] {
        assert!(!page.contains(external), "the page loads {external}…");
    }
    let (status, _) = get(&addr, "/api/nothing");
    assert!(status.contains(" 404"), "{status}");

    // /api/status is `status --json`.
    let st = api(&addr, "/api/status");
    let cli = c.replica_status();
    let v = &st["volumes"][0];
    assert_eq!(st["serving"], serde_json::json!(true));
    assert_eq!(v["volume"], "v");
    assert_eq!(v["cause"], "protecting/ok", "{st}");
    assert_eq!(v["causes"], cli["volumes"][0]["causes"], "{st}\n{cli}");
    assert_eq!(v["size"], cli["volumes"][0]["size"]);

    // /api/lag: the head reports (one a second), 0 for an idle, durable volume.
    let mut lag = serde_json::Value::Null;
    wait_until(
        "three head reports with a lag of 0 in /api/lag",
        Duration::from_secs(30),
        || {
            lag = api(&addr, "/api/lag");
            lag["v"].as_array().is_some_and(|s| {
                s.iter()
                    .filter(|r| r["lag_ms"] == serde_json::json!(0))
                    .count()
                    >= 3
            })
        },
    );
    let times: Vec<i64> = lag["v"]
        .as_array()
        .expect("samples")
        .iter()
        .map(|s| s["at_ms"].as_i64().expect("at_ms"))
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "oldest first: {times:?}"
    );

    // /api/bookmarks and /api/events.
    let bm = api(&addr, "/api/bookmarks");
    let names: Vec<(&str, u64)> = bm["v"]
        .as_array()
        .expect("bookmarks of group v")
        .iter()
        .map(|p| {
            (
                p["bookmark"].as_str().expect("name"),
                p["seq"].as_u64().expect("seq"),
            )
        })
        .collect();
    assert_eq!(names, [("before-upgrade", mark)], "{bm}");
    let verify = api(&addr, "/api/verify");
    assert_eq!(verify[0]["volume"], "v", "{verify}");
    assert_eq!(verify[0]["chunks"], serde_json::json!(16), "{verify}");
    let ev = api(&addr, "/api/events");
    let events = ev.as_array().expect("events");
    assert!(
        events
            .iter()
            .any(|e| e["group"] == "v" && e["message"].as_str().is_some_and(|m| !m.is_empty())),
        "{ev}"
    );
    let newest = events[0]["message"].as_str().expect("message").to_owned();

    // The page, rendered by a browser with its scripts.
    let profile = c.dir.path().join("chromium");
    let url = format!("http://{addr}/");
    let dom = rendered(&url, &profile);
    assert!(
        dom.contains("data-updated="),
        "the page's refresh never completed:\n{dom}"
    );
    assert!(
        dom.contains("<div id=\"error\"></div>"),
        "the page shows an error:\n{dom}"
    );
    assert!(
        dom.contains("data-volume=\"v\" data-cause=\"protecting/ok\""),
        "{dom}"
    );
    assert!(dom.contains("data-bookmark=\"before-upgrade\""), "{dom}");
    assert!(dom.contains("id=\"lag-v\""), "{dom}");
    let timeline = dom
        .split("id=\"timeline-v\"")
        .nth(1)
        .expect("the window's time line");
    assert!(
        timeline.contains("class=\"bookmark\"") && timeline.contains("before-upgrade"),
        "the bookmark on the time line:\n{dom}"
    );
    assert!(dom.contains("data-coverage="), "{dom}");
    let points = dom
        .split("<polyline points=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a lag line");
    assert!(points.split(' ').count() >= 3, "lag line: {points}");
    let escaped = newest
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    assert!(
        dom.contains(&escaped),
        "the newest event {newest:?}:\n{dom}"
    );

    // A screenshot for a human to look at (kept with the build's artifacts).
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        &url,
        &profile,
        &[
            "--window-size=1200,900".to_owned(),
            format!("--screenshot={}", shot.display()),
        ],
    );
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG"),
        "not a PNG: {} bytes",
        png.len()
    );
    eprintln!("console screenshot: {}", shot.display());

    // The agent goes away: the API and the page follow the cause.
    c.agent.as_mut().expect("agent").kill9();
    wait_until(
        "/api/status to name the link down",
        Duration::from_secs(60),
        || api(&addr, "/api/status")["volumes"][0]["cause"] == "disconnected/link-down",
    );
    let dom = rendered(&url, &profile);
    assert!(
        dom.contains("data-volume=\"v\" data-cause=\"disconnected/link-down\""),
        "{dom}"
    );
}
