//! The agent's own reads of whole chunks (syncs, resyncs, the verifier) leave the device's
//! pages out of the page cache: a sync reads the whole device, and its pages, cached as large
//! folios, would make the client's later small writes cost about twice as much (BENCHMARKS.md,
//! section 1). Page residency is read with util-linux's `fincore`.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use cdp_agent::device::{BlockDev, FileDev};
use rand::RngCore;

const MIB: u64 = 1 << 20;

/// Bytes of `path` in the page cache.
fn cached_bytes(path: &Path) -> u64 {
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output()
        .expect("run fincore (util-linux)");
    assert!(out.status.success(), "fincore failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("fincore printed {text:?}"))
}

#[test]
fn uncached_reads_leave_the_device_out_of_the_page_cache() {
    // Under target/, not /tmp: on tmpfs the page cache is the storage and cannot be dropped.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let path = dir.path().join("dev.img");
    let size = 8 * MIB + 4096;
    let mut data = vec![0u8; size as usize];
    rand::rng().fill_bytes(&mut data);
    {
        let mut f = std::fs::File::create(&path).expect("create");
        f.write_all(&data).expect("write");
        f.sync_all().expect("sync");
        // Out of the cache, as a device the agent starts on is. (Pages the client's own I/O
        // caches are the client's: a read of one chunk does not drop a large folio that
        // reaches past the chunk.)
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).expect("fadvise");
    }
    assert_eq!(cached_bytes(&path), 0, "the device starts out of the cache");

    let dev = FileDev::open(&path).expect("open");
    let chunks = size.div_ceil(MIB);
    let len_of = |c: u64| MIB.min(size - c * MIB);
    for c in 0..chunks {
        let mut buf = vec![0u8; len_of(c) as usize];
        let then = (c + 1 < chunks).then(|| ((c + 1) * MIB, len_of(c + 1)));
        dev.read_uncached(&mut buf, c * MIB, then)
            .expect("read_uncached");
        assert!(
            buf == data[(c * MIB) as usize..(c * MIB) as usize + buf.len()],
            "chunk {c} reads the device's bytes"
        );
    }
    assert_eq!(
        cached_bytes(&path),
        0,
        "a whole-device read in order leaves none of it cached"
    );

    // Pages the client dirtied stay cached (they are only queued for writeback), and a read
    // sees the client's bytes.
    let patch = vec![0xa5u8; 4096];
    dev.write_at(&patch, 3 * MIB).expect("write");
    let mut buf = vec![0u8; MIB as usize];
    dev.read_uncached(&mut buf, 3 * MIB, None).expect("read");
    assert_eq!(&buf[..4096], &patch[..], "the read sees the client's write");
    assert_eq!(
        &buf[4096..],
        &data[(3 * MIB + 4096) as usize..(4 * MIB) as usize]
    );
}
