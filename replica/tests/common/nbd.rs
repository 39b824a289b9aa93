//! A minimal NBD client for the replica's export and failover tests: fixed newstyle handshake
//! with NBD_OPT_GO, simple replies, one request at a time.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use cdp_shared::nbd::proto;

use super::DEADLINE;

/// NBD's EPERM, what a read-only export answers to a write.
pub const NBD_EPERM: u32 = 1;

pub struct Nbd {
    s: UnixStream,
    pub size: u64,
    pub flags: u16,
    handle: u64,
}

impl Nbd {
    pub fn connect(socket: &Path, name: &str) -> Nbd {
        let mut s = UnixStream::connect(socket)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()));
        s.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).expect("server greeting");
        assert_eq!(
            u64::from_be_bytes(hello[0..8].try_into().expect("8")),
            proto::NBD_MAGIC
        );
        assert_eq!(
            u64::from_be_bytes(hello[8..16].try_into().expect("8")),
            proto::NBD_IHAVEOPT
        );
        let flags = proto::NBD_FLAG_C_FIXED_NEWSTYLE | proto::NBD_FLAG_C_NO_ZEROES;
        s.write_all(&flags.to_be_bytes()).expect("client flags");
        let mut opt = Vec::new();
        opt.extend_from_slice(&proto::NBD_IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&proto::NBD_OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
        opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
        opt.extend_from_slice(name.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt).expect("NBD_OPT_GO");
        let (mut size, mut eflags) = (None, 0u16);
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).expect("option reply");
            let typ = u32::from_be_bytes(h[12..16].try_into().expect("4"));
            let len = u32::from_be_bytes(h[16..20].try_into().expect("4")) as usize;
            let mut data = vec![0u8; len];
            s.read_exact(&mut data).expect("option reply data");
            if typ == proto::NBD_REP_ACK {
                break;
            }
            assert!(
                typ & (1 << 31) == 0,
                "export {name:?} refused: {}",
                String::from_utf8_lossy(&data)
            );
            if typ == proto::NBD_REP_INFO
                && u16::from_be_bytes(data[0..2].try_into().expect("2")) == proto::NBD_INFO_EXPORT
            {
                size = Some(u64::from_be_bytes(data[2..10].try_into().expect("8")));
                eflags = u16::from_be_bytes(data[10..12].try_into().expect("2"));
            }
        }
        Nbd {
            s,
            size: size.expect("NBD_INFO_EXPORT"),
            flags: eflags,
            handle: 0,
        }
    }

    /// Sends one request and returns (error, data of a successful read).
    pub fn request(&mut self, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> (u32, Vec<u8>) {
        self.handle += 1;
        let mut r = Vec::with_capacity(28 + payload.len());
        r.extend_from_slice(&proto::NBD_REQUEST_MAGIC.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&cmd.to_be_bytes());
        r.extend_from_slice(&self.handle.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(payload);
        self.s.write_all(&r).expect("send a request");
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("reply");
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().expect("4")),
            proto::NBD_SIMPLE_REPLY_MAGIC
        );
        let error = u32::from_be_bytes(h[4..8].try_into().expect("4"));
        assert_eq!(
            u64::from_be_bytes(h[8..16].try_into().expect("8")),
            self.handle
        );
        let mut data = Vec::new();
        if cmd == proto::NBD_CMD_READ && error == 0 {
            data.resize(len as usize, 0);
            self.s.read_exact(&mut data).expect("read data");
        }
        (error, data)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let (e, data) = self.request(proto::NBD_CMD_READ, offset, len, &[]);
        assert_eq!(e, 0, "read of {len} bytes at {offset} failed");
        data
    }

    /// The whole export, in reads of `step` bytes (not a divisor of a chunk: reads span
    /// chunks at odd offsets).
    pub fn read_all(&mut self, step: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size as usize);
        let mut at = 0;
        while at < self.size {
            let n = step.min(self.size - at);
            out.extend(self.read(at, n as u32));
            at += n;
        }
        out
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.request(proto::NBD_CMD_WRITE, offset, data.len() as u32, data)
            .0
    }

    pub fn disconnect(mut self) {
        self.handle += 1;
        let mut r = Vec::new();
        r.extend_from_slice(&proto::NBD_REQUEST_MAGIC.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&proto::NBD_CMD_DISC.to_be_bytes());
        r.extend_from_slice(&self.handle.to_be_bytes());
        r.extend_from_slice(&[0u8; 12]);
        let _ = self.s.write_all(&r);
    }

    pub fn flush(&mut self) {
        let (e, _) = self.request(proto::NBD_CMD_FLUSH, 0, 0, &[]);
        assert_eq!(e, 0, "flush failed");
    }
}
