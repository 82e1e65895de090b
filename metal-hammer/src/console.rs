//! Console output: stage markers for machines (the lab waits on them) and log lines for people.
//!
//! Markers go to stdout, logs to stderr; as PID 1 both are the kernel console.

use std::fmt::Write as _;
use std::io::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Start,
    Ok,
    Error,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Start => "start",
            Status::Ok => "ok",
            Status::Error => "error",
        }
    }
}

/// Renders `METAL-HAMMER stage=<stage> status=<status> k=v …`. Values that are empty or contain
/// whitespace or quotes are double-quoted, with inner double quotes turned into single ones and
/// newlines into spaces, so a marker is always one parseable line.
pub fn render_marker(stage: &str, status: Status, fields: &[(&str, &str)]) -> String {
    let mut line = format!("{} stage={stage} status={}", metal_types::HAMMER_MARKER, status.as_str());
    for (k, v) in fields {
        let clean: String = v
            .chars()
            .map(|c| {
                if c == '"' {
                    '\''
                } else if c.is_control() {
                    ' '
                } else {
                    c
                }
            })
            .collect();
        if clean.is_empty() || clean.chars().any(|c| c.is_whitespace() || c == '\'') {
            let _ = write!(line, " {k}=\"{clean}\"");
        } else {
            let _ = write!(line, " {k}={clean}");
        }
    }
    line
}

/// Prints a stage marker on the console.
pub fn marker(stage: &str, status: Status, fields: &[(&str, &str)]) {
    let line = render_marker(stage, status, fields);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Prints a stage marker followed by ready-made `key=value` text (as the install steps give it).
pub fn marker_detail(stage: &str, status: Status, detail: &str) {
    let mut line = render_marker(stage, status, &[]);
    let detail: String = detail.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if !detail.trim().is_empty() {
        line.push(' ');
        line.push_str(detail.trim());
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Time since boot (`CLOCK_BOOTTIME`), so our lines sort in with the kernel's.
fn since_boot() -> std::time::Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we pass.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } == 0 {
        std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    } else {
        std::time::Duration::ZERO
    }
}

/// Writes one log line to stderr with the time since boot.
pub fn log_line(args: std::fmt::Arguments<'_>) {
    let t = since_boot();
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "[{:>5}.{:06}] metal-hammer: {args}", t.as_secs(), t.subsec_micros());
}

/// `log!("…", args)`: a line on the console.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => { $crate::console::log_line(format_args!($($arg)*)) };
}

/// Renders an error with its whole `source()` chain: `outer: inner: innermost`.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let msg = e.to_string();
        if !s.ends_with(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = e.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_quote_only_what_needs_it() {
        assert_eq!(render_marker("register", Status::Ok, &[]), "METAL-HAMMER stage=register status=ok");
        assert_eq!(
            render_marker("fatal", Status::Error, &[("error", "no \"api\"\nhere"), ("disks", "2")]),
            "METAL-HAMMER stage=fatal status=error error=\"no 'api' here\" disks=2"
        );
    }

    #[test]
    fn chain_joins_sources() {
        #[derive(Debug, thiserror::Error)]
        #[error("register failed")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("connection refused"));
        assert_eq!(chain(&e), "register failed: connection refused");
    }
}
