//! How much memory the install takes: metal-hammer's own peak resident set (`VmHWM` of
//! `/proc/self/status`, all threads) and the lowest `MemAvailable` of `/proc/meminfo` seen while
//! a [`Watch`] runs. The initramfs itself lives in RAM, so the second figure is what the whole
//! machine had left, page cache of the image being written counted as reclaimable.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The value in KiB of a `Key:   1234 kB` line of a `/proc` status or meminfo text.
pub fn field_kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let mut words = rest.split_whitespace();
        let n = words.next()?.parse().ok()?;
        match words.next() {
            Some("kB") | None => Some(n),
            Some(_) => None,
        }
    })
}

/// Memory figures of one install, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryReport {
    /// Peak resident set of this process since it started (`VmHWM`).
    pub peak_rss_kib: u64,
    /// `MemTotal`.
    pub total_kib: u64,
    /// `MemAvailable` when the watch started.
    pub available_start_kib: u64,
    /// Lowest `MemAvailable` sampled while the watch ran.
    pub available_min_kib: u64,
}

impl MemoryReport {
    /// `key=value` text for a stage marker.
    pub fn marker_fields(&self) -> String {
        format!(
            "peak_rss_kib={} mem_total_kib={} mem_available_start_kib={} mem_available_min_kib={}",
            self.peak_rss_kib, self.total_kib, self.available_start_kib, self.available_min_kib
        )
    }
}

/// Samples `MemAvailable` on a thread until [`Watch::finish`].
pub struct Watch {
    proc_root: PathBuf,
    stop: Arc<AtomicBool>,
    min: Arc<AtomicU64>,
    total_kib: u64,
    available_start_kib: u64,
    thread: Option<JoinHandle<()>>,
}

impl Watch {
    /// Starts sampling `<proc_root>/meminfo` every `every`.
    pub fn start(proc_root: &Path, every: Duration) -> Watch {
        let meminfo = proc_root.join("meminfo");
        let read = move |key: &str| std::fs::read_to_string(&meminfo).ok().and_then(|t| field_kib(&t, key));
        let total_kib = read("MemTotal").unwrap_or(0);
        let available_start_kib = read("MemAvailable").unwrap_or(0);
        let stop = Arc::new(AtomicBool::new(false));
        let min = Arc::new(AtomicU64::new(if available_start_kib > 0 { available_start_kib } else { u64::MAX }));
        let thread = {
            let (stop, min) = (stop.clone(), min.clone());
            std::thread::Builder::new()
                .name("memwatch".into())
                .spawn(move || loop {
                    if let Some(a) = read("MemAvailable") {
                        min.fetch_min(a, Ordering::Relaxed);
                    }
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::park_timeout(every);
                })
                .ok()
        };
        Watch { proc_root: proc_root.to_path_buf(), stop, min, total_kib, available_start_kib, thread }
    }

    /// Stops sampling (after one last sample) and reads the peak resident set.
    pub fn finish(mut self) -> MemoryReport {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        let status = std::fs::read_to_string(self.proc_root.join("self/status")).unwrap_or_default();
        let min = self.min.load(Ordering::Relaxed);
        MemoryReport {
            peak_rss_kib: field_kib(&status, "VmHWM").unwrap_or(0),
            total_kib: self.total_kib,
            available_start_kib: self.available_start_kib,
            available_min_kib: if min == u64::MAX { 0 } else { min },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_by_exact_key() {
        let status = "Name:\tmetal-hammer\nVmPeak:\t  200000 kB\nVmHWM:\t   51234 kB\nVmRSS:\t   40000 kB\nThreads:\t5\n";
        assert_eq!(field_kib(status, "VmHWM"), Some(51234));
        assert_eq!(field_kib(status, "VmRSS"), Some(40000));
        assert_eq!(field_kib(status, "Threads"), Some(5));
        assert_eq!(field_kib(status, "VmHW"), None);
        assert_eq!(field_kib(status, "Name"), None);
        let meminfo = "MemTotal:        1004096 kB\nMemFree:          500000 kB\nMemAvailable:     812345 kB\n";
        assert_eq!(field_kib(meminfo, "MemAvailable"), Some(812345));
        assert_eq!(field_kib(meminfo, "Mem"), None);
    }

    #[test]
    fn watch_keeps_the_lowest_sample() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("self")).unwrap();
        std::fs::write(dir.path().join("self/status"), "VmHWM:\t  4242 kB\n").unwrap();
        let meminfo = |avail: u64| format!("MemTotal: 1000000 kB\nMemAvailable: {avail} kB\n");
        std::fs::write(dir.path().join("meminfo"), meminfo(900_000)).unwrap();
        let watch = Watch::start(dir.path(), Duration::from_millis(5));
        // Each write replaces the file (rename), so the sampler never reads half a file.
        let set = |avail: u64| {
            let tmp = dir.path().join("meminfo.tmp");
            std::fs::write(&tmp, meminfo(avail)).unwrap();
            std::fs::rename(&tmp, dir.path().join("meminfo")).unwrap();
        };
        set(300_000);
        std::thread::sleep(Duration::from_millis(100));
        set(700_000);
        std::thread::sleep(Duration::from_millis(50));
        let r = watch.finish();
        assert_eq!(
            r,
            MemoryReport { peak_rss_kib: 4242, total_kib: 1_000_000, available_start_kib: 900_000, available_min_kib: 300_000 }
        );
        assert_eq!(
            r.marker_fields(),
            "peak_rss_kib=4242 mem_total_kib=1000000 mem_available_start_kib=900000 mem_available_min_kib=300000"
        );
    }
}
