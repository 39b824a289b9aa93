//! Interoperability with NBD clients nobody here wrote, through the agent, with replication
//! on: nbdinfo lists the exports with the right size; qemu-io writes and reads patterns;
//! nbdcopy copies a whole image in and out; fio's nbd engine runs a random-write job with
//! verification. Afterwards the replica's `latest` restore equals each device.
//! Two volumes in one consistency group, so the group's shared log is exercised too.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn real_clients_through_the_agent_and_latest_equals_the_device() {
    let tools = ["nbdinfo", "qemu-io", "nbdcopy", "fio"];
    if !tools.iter().all(|t| require_tool(t)) {
        return;
    }
    let mut c = Cluster::new();
    let dev_a = c.make_device("a.img", 32 * MIB, 4 * MIB, 1);
    let dev_b = c.make_device("b.img", 48 * MIB, 0, 2);
    c.protect("alpha", &dev_a, Some("pair"));
    c.protect("beta", &dev_b, Some("pair"));
    c.start_replica();
    c.start_agent();
    c.wait_protecting("alpha", Duration::from_secs(60));
    c.wait_protecting("beta", Duration::from_secs(60));

    // nbdinfo: both exports, with their sizes.
    let list = run_ok(
        Command::new("nbdinfo")
            .args(["--list", "--json"])
            .arg(format!("nbd+unix://?socket={}", c.nbd_socket().display())),
    );
    let list: serde_json::Value = serde_json::from_str(&list).expect("nbdinfo JSON");
    let exports = list["exports"].as_array().expect("exports");
    let size_of = |name: &str| {
        exports
            .iter()
            .find(|e| e["export-name"] == name)
            .and_then(|e| e["export-size"].as_u64())
    };
    assert_eq!(size_of("alpha"), Some(32 * MIB), "nbdinfo: {list}");
    assert_eq!(size_of("beta"), Some(48 * MIB), "nbdinfo: {list}");

    // qemu-io: patterns written and read back (a failed pattern check makes qemu-io print
    // "Pattern verification failed").
    let out = run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", &c.nbd_uri("alpha")])
            .args([
                "-c",
                "write -P 0x33 0 32M", // the largest request: its records span batches
                "-c",
                "write -P 0x11 0 1M",
                "-c",
                "write -P 0x22 1044480 8192", // across the first chunk boundary
                "-c",
                "write -z 5M 512k",
                "-c",
                "discard 6M 1M",
                "-c",
                "read -P 0x11 0 1040384",
                "-c",
                "read -P 0x22 1044480 8192",
                "-c",
                "read -P 0 5M 512k",
                "-c",
                "read -P 0x33 24M 8M",
                "-c",
                "flush",
            ]),
    );
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io: {out}"
    );

    // nbdcopy: a whole image in, then out again.
    let image = c.make_device("in.img", 48 * MIB, 48 * MIB, 99);
    run_ok(Command::new("nbdcopy").arg(&image).arg(c.nbd_uri("beta")));
    let copied_out = c.path("out.img");
    run_ok(
        Command::new("nbdcopy")
            .arg(c.nbd_uri("beta"))
            .arg(&copied_out),
    );
    assert_same_image(
        "nbdcopy out equals nbdcopy in",
        &read_file(&copied_out),
        &read_file(&image),
    );

    // fio's nbd engine: random writes with verification, several in flight.
    let out = run_ok(Command::new("fio").current_dir(c.dir.path()).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", c.nbd_uri("alpha")),
        "--rw=randwrite",
        "--bs=4k",
        "--size=8M",
        "--offset=16M",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=json",
    ]));
    let fio: serde_json::Value =
        serde_json::from_str(out.trim_start_matches(|ch| ch != '{')).expect("fio JSON");
    let job = &fio["jobs"][0];
    assert_eq!(
        job["error"].as_i64(),
        Some(0),
        "fio reported an error: {job}"
    );
    assert!(
        job["write"]["io_bytes"].as_u64().unwrap_or(0) >= 8 * MIB,
        "fio wrote the job: {job}"
    );

    // Everything reaches the replica, and `latest` equals each device.
    let bm = run_ok(&mut c.agent_cmd(&["bookmark", "interop-done", "--wait"]));
    assert!(bm.contains("durable"), "{bm}");
    for (name, dev) in [("alpha", &dev_a), ("beta", &dev_b)] {
        let restored = c
            .restore(name, "latest")
            .unwrap_or_else(|e| panic!("restore {name}: {e}"));
        assert_same_image(
            &format!("latest restore of {name} vs its device"),
            &restored,
            &read_file(dev),
        );
        let by_name = c
            .restore(name, "bookmark:interop-done")
            .unwrap_or_else(|e| panic!("restore {name}: {e}"));
        assert_same_image(
            &format!("bookmark restore of {name}"),
            &by_name,
            &read_file(dev),
        );
    }
    let agent = c.agent.as_mut().expect("agent");
    assert!(
        agent.stop(Duration::from_secs(30)),
        "the agent stops cleanly: {}",
        agent.log_text()
    );
}
