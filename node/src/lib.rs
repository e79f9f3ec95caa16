//! The `protonode` binary's parts: command line, daemon, control API,
//! human output and the demo. Kept as a library so integration tests can
//! drive the same code.

/// Writes to stdout; `false` if it is closed or failed (`protonode demo |
/// head`: the reader went away). Never panics, unlike `print!`.
pub fn write_stdout(args: std::fmt::Arguments) -> bool {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_fmt(args).and_then(|()| out.flush()).is_ok()
}

/// `println!` for code that must go on when stdout is closed (the daemon,
/// the demo, which cleans up after itself).
#[macro_export]
macro_rules! say {
    () => {
        $crate::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub mod cli;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod output;
