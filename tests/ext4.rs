//! A real filesystem (issue 5): ext4 made on a loop device over `nbdfuse` over the agent's
//! export. Files are written, the filesystem is frozen and bookmarked, more files are written
//! and some deleted; the bookmark restored to an image (and onto a loop block device), and
//! exported over NBD (nbdfuse over
//! `cdp-replica export`, a read-only loop device), passes `fsck.ext4 -fn` and, mounted, shows
//! exactly the files of the bookmark.
//!
//! Needs root, FUSE and loop devices (CI has them); elsewhere it is skipped with a reason.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

/// Undoes one piece of the stack on drop (in reverse order of creation).
struct Cleanup(Vec<(String, Vec<String>)>);

impl Cleanup {
    fn push(&mut self, cmd: &str, args: &[&str]) {
        self.0
            .push((cmd.to_owned(), args.iter().map(|a| a.to_string()).collect()));
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (cmd, args) in self.0.drain(..).rev() {
            let _ = Command::new(&cmd).args(&args).status();
        }
    }
}

fn is_root() -> bool {
    run(Command::new("id").arg("-u")).stdout.starts_with(b"0")
}

/// name → blake3 of the content, for every regular file under `dir` (lost+found aside).
fn files(dir: &Path) -> BTreeMap<String, [u8; 32]> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let entry = entry.expect("entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "lost+found" {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            for (k, v) in files(&path) {
                out.insert(format!("{name}/{k}"), v);
            }
        } else {
            out.insert(name, *blake3::hash(&read_file(&path)).as_bytes());
        }
    }
    out
}

fn write_file(path: &Path, len: usize, seed: u64) {
    let mut buf = vec![0u8; len];
    Lcg(seed).fill(&mut buf);
    std::fs::write(path, buf).expect("write file");
}

/// Mounts `image` read-only on a fresh directory and returns its files.
fn files_of_image(dir: &Path, image: &Path, cleanup: &mut Cleanup) -> BTreeMap<String, [u8; 32]> {
    let mnt = dir.join(format!(
        "check-{}",
        image.file_name().expect("name").to_string_lossy()
    ));
    std::fs::create_dir_all(&mnt).expect("mount point");
    run_ok(
        Command::new("mount")
            .args(["-o", "ro,loop,noload"])
            .arg(image)
            .arg(&mnt),
    );
    cleanup.push("umount", &[&mnt.to_string_lossy()]);
    let found = files(&mnt);
    run_ok(Command::new("umount").arg(&mnt));
    found
}

#[test]
fn ext4_over_nbdfuse_restores_exactly_the_files_of_a_bookmark() {
    let tools = [
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "fsck.ext4",
        "fsfreeze",
        "mount",
    ];
    if !tools.iter().all(|t| require_tool(t)) {
        return;
    }
    if !is_root() || !Path::new("/dev/fuse").exists() {
        assert!(!in_ci(), "this test needs root and /dev/fuse, which CI has");
        eprintln!("SKIPPED: this test needs root, FUSE and loop devices");
        return;
    }
    let mut cleanup = Cleanup(Vec::new());
    let mut c = Cluster::new();
    let dev = c.make_device("fs.img", 256 * MIB, 0, 1);
    c.protect("fs", &dev, None);
    c.start_replica();
    c.start_agent();
    c.wait_protecting("fs", Duration::from_secs(120));

    // ext4 on /dev/loopN over nbdfuse over the agent's export.
    let fuse_dir = c.path("fuse");
    std::fs::create_dir_all(&fuse_dir).expect("fuse dir");
    let pidfile = c.path("nbdfuse.pid");
    let mut nbdfuse = Proc::spawn(
        "nbdfuse",
        Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(fuse_dir.join("vol"))
            .arg(c.nbd_uri("fs")),
        &c.path("nbdfuse.log"),
    );
    cleanup.push("fusermount3", &["-u", &fuse_dir.to_string_lossy()]);
    wait_until(
        "nbdfuse to serve the volume",
        Duration::from_secs(30),
        || pidfile.exists() && fuse_dir.join("vol").exists(),
    );
    let loop_dev = run_ok(
        Command::new("losetup")
            .args(["-f", "--show"])
            .arg(fuse_dir.join("vol")),
    )
    .trim()
    .to_owned();
    cleanup.push("losetup", &["-d", &loop_dev]);
    run_ok(Command::new("mkfs.ext4").args(["-q", &loop_dev]));
    let fs: PathBuf = c.path("fs");
    std::fs::create_dir_all(&fs).expect("fs dir");
    run_ok(Command::new("mount").arg(&loop_dev).arg(&fs));
    cleanup.push("umount", &[&fs.to_string_lossy()]);

    // Files, a directory, then a frozen filesystem bookmarked.
    std::fs::create_dir_all(fs.join("dir")).expect("mkdir");
    for i in 0..12u64 {
        write_file(
            &fs.join(format!("f{i}.bin")),
            (1 + i as usize * 37) * 4096 + i as usize,
            i,
        );
    }
    write_file(&fs.join("dir/big.bin"), 12 << 20, 99);
    run_ok(&mut Command::new("sync"));
    let expected = files(&fs);
    run_ok(Command::new("fsfreeze").arg("-f").arg(&fs));
    let bm = run(&mut c.agent_cmd(&["bookmark", "fs-consistent", "--wait"]));
    run_ok(Command::new("fsfreeze").arg("-u").arg(&fs));
    assert!(
        bm.status.success(),
        "bookmark: {}",
        String::from_utf8_lossy(&bm.stderr)
    );

    // More files, and some deleted.
    for i in 0..6u64 {
        std::fs::remove_file(fs.join(format!("f{i}.bin"))).expect("rm");
        write_file(&fs.join(format!("new{i}.bin")), 64 << 10, 1000 + i);
    }
    write_file(&fs.join("dir/big.bin"), 3 << 20, 7);
    run_ok(&mut Command::new("sync"));
    let later = files(&fs);
    assert_ne!(later, expected);

    // The bookmark, restored to an image: fsck clean and exactly the files of the bookmark.
    let image = c.path("bookmark.img");
    run_ok(&mut c.replica_cmd(&[
        "restore",
        "--volume",
        "fs",
        "--at",
        "bookmark:fs-consistent",
        "--out",
        &image.to_string_lossy(),
    ]));
    let fsck = run(Command::new("fsck.ext4").arg("-fn").arg(&image));
    assert!(
        fsck.status.success(),
        "fsck.ext4 -fn of the restored bookmark: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let dir = c.path("");
    assert_eq!(
        files_of_image(&dir, &image, &mut cleanup),
        expected,
        "the restored bookmark holds exactly its files"
    );

    // The bookmark restored onto a block device (a loop device over a file of garbage): the
    // device then holds exactly the image, zeros included.
    let blk_file = c.path("blk.img");
    {
        let mut junk = vec![0u8; 256 * MIB as usize];
        Lcg(5).fill(&mut junk);
        std::fs::write(&blk_file, &junk).expect("block device file");
    }
    let blk = run_ok(
        Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&blk_file),
    )
    .trim()
    .to_owned();
    cleanup.push("losetup", &["-d", &blk]);
    run_ok(&mut c.replica_cmd(&[
        "restore",
        "--volume",
        "fs",
        "--at",
        "bookmark:fs-consistent",
        "--out",
        &blk,
    ]));
    run_ok(Command::new("losetup").args(["-d", &blk]));
    assert!(
        read_file(&blk_file) == read_file(&image),
        "the block device holds exactly the restored image"
    );

    // The bookmark exported (no copy): nbdfuse over the export, a read-only loop device,
    // fsck clean and exactly the files of the bookmark.
    let export_sock = c.path("export.sock");
    let mut export = c.start_export("fs", "bookmark:fs-consistent", &export_sock, &[]);
    let efuse_dir = c.path("efuse");
    std::fs::create_dir_all(&efuse_dir).expect("fuse dir");
    let epidfile = c.path("nbdfuse-export.pid");
    let mut efuse = Proc::spawn(
        "nbdfuse-export",
        Command::new("nbdfuse")
            .arg("-r")
            .arg("-P")
            .arg(&epidfile)
            .arg(efuse_dir.join("vol"))
            .arg(format!("nbd+unix:///fs?socket={}", export_sock.display())),
        &c.path("nbdfuse-export.log"),
    );
    cleanup.push("fusermount3", &["-u", &efuse_dir.to_string_lossy()]);
    wait_until(
        "nbdfuse to serve the export",
        Duration::from_secs(30),
        || epidfile.exists() && efuse_dir.join("vol").exists(),
    );
    let eloop = run_ok(
        Command::new("losetup")
            .args(["-r", "-f", "--show"])
            .arg(efuse_dir.join("vol")),
    )
    .trim()
    .to_owned();
    cleanup.push("losetup", &["-d", &eloop]);
    let fsck = run(Command::new("fsck.ext4").arg("-fn").arg(&eloop));
    assert!(
        fsck.status.success(),
        "fsck.ext4 -fn of the exported bookmark: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let emnt = c.path("export-mnt");
    std::fs::create_dir_all(&emnt).expect("mount point");
    run_ok(
        Command::new("mount")
            .args(["-o", "ro,noload"])
            .arg(&eloop)
            .arg(&emnt),
    );
    cleanup.push("umount", &[&emnt.to_string_lossy()]);
    assert_eq!(
        files(&emnt),
        expected,
        "the exported bookmark holds exactly its files"
    );
    run_ok(Command::new("umount").arg(&emnt));
    run_ok(Command::new("losetup").args(["-d", &eloop]));
    run_ok(Command::new("fusermount3").arg("-u").arg(&efuse_dir));
    efuse.stop(Duration::from_secs(10));
    assert!(export.stop(Duration::from_secs(10)), "the export exits 0");

    // And latest (after unmounting, so the filesystem is clean) holds the later files.
    run_ok(Command::new("umount").arg(&fs));
    run_ok(Command::new("losetup").args(["-d", &loop_dev]));
    run_ok(&mut c.agent_cmd(&["bookmark", "after-umount", "--wait"]));
    let latest = c.path("latest.img");
    run_ok(&mut c.replica_cmd(&[
        "restore",
        "--volume",
        "fs",
        "--at",
        "bookmark:after-umount",
        "--out",
        &latest.to_string_lossy(),
    ]));
    let fsck = run(Command::new("fsck.ext4").arg("-fn").arg(&latest));
    assert!(
        fsck.status.success(),
        "fsck.ext4 -fn of latest: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    assert_eq!(
        files_of_image(&dir, &latest, &mut cleanup),
        later,
        "latest holds the later files"
    );
    nbdfuse.stop(Duration::from_secs(10));
}
