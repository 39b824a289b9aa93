//! Hash-compare resync (issue 4): a 1 GiB volume where about 1 % of the chunks were changed
//! behind the agent's back is compared with the replica's latest image chunk by chunk, and
//! only the chunks that differ are sent: about 1 % of the data, read from the agent's
//! bytes-sent counter. Afterwards the replica's `latest` equals the device.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[test]
fn hash_compare_resync_sends_only_the_chunks_that_differ() {
    let mut c = Cluster::new();
    let dev = c.make_device("v.img", GIB, 64 * MIB, 42);
    c.protect("v", &dev, None);
    c.start_replica();
    c.start_agent();
    c.wait_protecting("v", Duration::from_secs(300));
    c.wait_in_step("v", Duration::from_secs(300));
    let agent = c.agent.as_mut().expect("agent");
    assert!(
        agent.stop(Duration::from_secs(60)),
        "the agent stops cleanly"
    );

    // 10 of the 1024 chunks change without the agent (about 1 %).
    let chunks: Vec<u64> = (0..10).map(|i| 7 + i * 101).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&dev)
        .expect("open device");
    let mut buf = vec![0u8; MIB as usize];
    for (i, chunk) in chunks.iter().enumerate() {
        Lcg(1000 + i as u64).fill(&mut buf);
        f.seek(SeekFrom::Start(chunk * MIB)).expect("seek");
        f.write_all(&buf).expect("write");
    }
    f.sync_all().expect("sync");
    drop(f);

    c.start_agent();
    c.wait_in_step("v", Duration::from_secs(120));
    let out = run_ok(&mut c.agent_cmd(&["resync", "--volume", "v"]));
    assert!(
        out.contains("1024 chunks compared, 10 differed"),
        "exactly the changed chunks differ: {out}"
    );
    let sent = c.volume_status("v")["resync_bytes_sent"]
        .as_u64()
        .expect("bytes sent");
    assert!(
        (10 * MIB..=10 * MIB + 64 * 1024).contains(&sent),
        "about 1 % of the volume was sent: {sent} bytes"
    );
    c.wait_in_step("v", Duration::from_secs(120));
    let restored = c.restore("v", "latest").expect("restore");
    assert!(
        restored == read_file(&dev),
        "latest equals the device after the resync"
    );
}
