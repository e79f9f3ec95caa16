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

/// `path` as a shell word a person can paste: as it is when it is plain,
/// else in single quotes (a directory with spaces, quotes or `$`).
pub fn shell_word(path: &std::path::Path) -> String {
    let text = path.display().to_string();
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+,:@%=".contains(c));
    if plain {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

pub mod cli;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod output;

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn a_path_is_quoted_only_when_a_shell_needs_it() {
        assert_eq!(super::shell_word(Path::new("/tmp/alex")), "/tmp/alex");
        assert_eq!(
            super::shell_word(Path::new("/tmp/my node")),
            "'/tmp/my node'"
        );
        assert_eq!(super::shell_word(Path::new("/tmp/it's")), r"'/tmp/it'\''s'");
        assert_eq!(super::shell_word(Path::new("/tmp/$HOME")), "'/tmp/$HOME'");
    }
}
