//! Waiting for positive signals under one deadline per phase.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// One deadline shared by every wait inside a phase.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub phase: &'static str,
    end: Instant,
}

impl Deadline {
    pub fn new(phase: &'static str, budget: Duration) -> Deadline {
        Deadline { phase, end: Instant::now() + budget }
    }
    pub fn remaining(&self) -> Duration {
        self.end.saturating_duration_since(Instant::now())
    }
    pub fn expired(&self) -> bool {
        Instant::now() >= self.end
    }
}

/// Polls `probe` until it yields `Some`, or fails naming `what` when the deadline passes.
/// The poll interval is short; readiness is the probe's answer, never the passing of time.
pub async fn until<T, F, Fut>(deadline: &Deadline, what: &str, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if deadline.expired() {
            bail!("phase {:?}: timed out waiting for {what}", deadline.phase);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A log file (a serial console) read incrementally, so each marker is looked for after the
/// previous one.
pub struct LogCursor {
    path: std::path::PathBuf,
    offset: usize,
}

impl LogCursor {
    pub fn new(path: &Path) -> LogCursor {
        LogCursor { path: path.to_path_buf(), offset: 0 }
    }

    /// Waits until a line containing `needle` appears after the cursor; returns that line and
    /// moves the cursor past it. Fails early when a line contains any of `fail_on`.
    pub async fn wait_for(&mut self, deadline: &Deadline, needle: &str, fail_on: &[&str]) -> Result<String> {
        let path = self.path.clone();
        loop {
            let bytes = std::fs::read(&path).unwrap_or_default();
            if bytes.len() > self.offset {
                let text = String::from_utf8_lossy(&bytes[self.offset..]).into_owned();
                let mut consumed = 0;
                for line in text.split_inclusive('\n') {
                    if !line.ends_with('\n') {
                        break; // incomplete line: read it again next time
                    }
                    consumed += line.len();
                    if let Some(bad) = fail_on.iter().find(|f| line.contains(**f)) {
                        self.offset += consumed;
                        bail!(
                            "phase {:?}: serial console showed {bad:?} while waiting for {needle:?}: {}",
                            deadline.phase,
                            line.trim()
                        );
                    }
                    if line.contains(needle) {
                        self.offset += consumed;
                        return Ok(line.trim().to_string());
                    }
                }
                self.offset += consumed;
            }
            if deadline.expired() {
                bail!("phase {:?}: timed out waiting for {needle:?} on {}", deadline.phase, path.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
