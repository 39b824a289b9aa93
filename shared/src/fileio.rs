//! Reads that never wait for the disk: what lets a server answer a read the page cache holds
//! on the task that received it, without a handoff to the blocking pool (the agent's device
//! reads, the replica's export).

use std::fs::File;
use std::io;

/// Fills `buf` from `file` at `offset` if every byte is in the page cache already
/// (`preadv2(RWF_NOWAIT)`): `Ok(true)` then. `Ok(false)` when the kernel would have to wait
/// for the disk, cannot tell (no `RWF_NOWAIT` on this kernel or file system), or the range
/// passes the end of the file; the caller then reads on the blocking pool, where the blocking
/// read reports a short file. `buf` may be partly filled after `Ok(false)`.
pub fn read_cached_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<bool> {
    use rustix::io::{Errno, ReadWriteFlags, preadv2};
    let mut done = 0;
    while done < buf.len() {
        let mut slice = [io::IoSliceMut::new(&mut buf[done..])];
        match preadv2(
            file,
            &mut slice,
            offset + done as u64,
            ReadWriteFlags::NOWAIT,
        ) {
            Ok(0) => return Ok(false),
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(Errno::AGAIN | Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_cached_read_returns_the_bytes_and_declines_past_the_end() {
        let mut f = tempfile::tempfile().expect("tempfile");
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).expect("write");
        let mut buf = vec![0u8; 4096];
        // Just written, so cached (unless this kernel has no RWF_NOWAIT: then it declines).
        if read_cached_at(&f, &mut buf, 8192).expect("read") {
            assert_eq!(buf, data[8192..8192 + 4096]);
        }
        let mut past = vec![0u8; 8192];
        assert!(!read_cached_at(&f, &mut past, 60 * 1024).expect("read past the end"));
    }
}
