//! Standard output of the command-line tools: a reader that closed the pipe early
//! (`cdp-replica points | head`) ends the command quietly with exit code 0, where `println!`
//! would panic (exit 101).

use std::io::{self, Write};

/// Writes `args` to standard output, and exits the process with code 0 when the reader has
/// gone (`EPIPE`). Another write error is reported on standard error, exit code 1.
pub fn write_fmt(args: std::fmt::Arguments<'_>) {
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to standard output: {e}");
        std::process::exit(1);
    }
}

/// `println!` for the command-line tools: see [`write_fmt`].
#[macro_export]
macro_rules! outln {
    () => {
        $crate::stdout::write_fmt(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::stdout::write_fmt(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for the command-line tools: see [`write_fmt`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::stdout::write_fmt(format_args!($($arg)*))
    };
}
