//! The standard process metrics, read from `/proc/self` at each scrape: the names and meanings
//! Prometheus' client libraries use, so existing dashboards and alerts work unchanged.
//!
//! | metric | type | from |
//! |---|---|---|
//! | `process_cpu_seconds_total` | counter | `/proc/self/stat` utime + stime, in clock ticks |
//! | `process_resident_memory_bytes` | gauge | `/proc/self/stat` rss (pages) × page size |
//! | `process_virtual_memory_bytes` | gauge | `/proc/self/stat` vsize |
//! | `process_open_fds` | gauge | entries of `/proc/self/fd` |
//! | `process_max_fds` | gauge | `/proc/self/limits`, soft "Max open files" (left out when unlimited) |
//! | `process_start_time_seconds` | gauge | `/proc/self/stat` starttime + `btime` of `/proc/stat` (Unix time) |
//! | `process_threads` | gauge | `/proc/self/stat` num_threads |

use std::fmt;
use std::io;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// A [`Collector`] of the `process_*` metrics of the running process. Register it once per
/// registry: `registry.register_collector(Box::new(ProcessCollector))`. Where `/proc/self`
/// cannot be read (not Linux, a restricted sandbox), it reports nothing rather than failing
/// the scrape.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessCollector;

/// One reading of the process's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessStats {
    /// User plus system CPU time.
    pub cpu_seconds: f64,
    pub resident_memory_bytes: u64,
    pub virtual_memory_bytes: u64,
    pub open_fds: u64,
    /// The soft descriptor limit; `None` when unlimited.
    pub max_fds: Option<u64>,
    /// When the process started, in seconds since the Unix epoch.
    pub start_time_seconds: f64,
    pub threads: u64,
}

/// The fields of `/proc/<pid>/stat` used here (see proc(5)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    utime_ticks: u64,
    stime_ticks: u64,
    threads: u64,
    start_ticks: u64,
    vsize_bytes: u64,
    rss_pages: u64,
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("unexpected format of {what}"))
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may itself hold
/// spaces and parentheses, so the fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    // rest[0] is field 3 (state); field n is rest[n - 3].
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime_ticks: num(14)?,
        stime_ticks: num(15)?,
        threads: num(20)?,
        start_ticks: num(22)?,
        vsize_bytes: num(23)?,
        rss_pages: num(24)?,
    })
}

/// The boot time (`btime`, Unix seconds) from `/proc/stat`.
fn parse_btime(text: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix("btime")?.trim().parse().ok())
}

/// The soft "Max open files" limit from `/proc/<pid>/limits`: `Some(None)` when unlimited.
fn parse_max_fds(text: &str) -> Option<Option<u64>> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    if soft == "unlimited" {
        return Some(None);
    }
    soft.parse().ok().map(Some)
}

fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf only reads a configuration value.
    let v = unsafe { libc::sysconf(name) };
    u64::try_from(v).ok().filter(|v| *v > 0)
}

impl ProcessStats {
    /// Reads the figures of the calling process from `/proc/self` (and `btime` from `/proc/stat`).
    pub fn read() -> io::Result<ProcessStats> {
        let stat = parse_stat(&std::fs::read_to_string("/proc/self/stat")?).ok_or_else(|| bad("/proc/self/stat"))?;
        let btime = parse_btime(&std::fs::read_to_string("/proc/stat")?).ok_or_else(|| bad("/proc/stat"))?;
        let max_fds = parse_max_fds(&std::fs::read_to_string("/proc/self/limits")?).ok_or_else(|| bad("/proc/self/limits"))?;
        let open_fds = std::fs::read_dir("/proc/self/fd")?.count() as u64;
        let ticks = sysconf(libc::_SC_CLK_TCK).ok_or_else(|| bad("sysconf(_SC_CLK_TCK)"))? as f64;
        let page = sysconf(libc::_SC_PAGESIZE).ok_or_else(|| bad("sysconf(_SC_PAGESIZE)"))?;
        Ok(ProcessStats {
            cpu_seconds: (stat.utime_ticks + stat.stime_ticks) as f64 / ticks,
            resident_memory_bytes: stat.rss_pages * page,
            virtual_memory_bytes: stat.vsize_bytes,
            open_fds,
            max_fds,
            start_time_seconds: btime as f64 + stat.start_ticks as f64 / ticks,
            threads: stat.threads,
        })
    }
}

fn counter<N: EncodeCounterValue>(enc: &mut DescriptorEncoder, name: &str, help: &str, v: N) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge<N: EncodeGaugeValue>(enc: &mut DescriptorEncoder, name: &str, help: &str, v: N) -> fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let Ok(s) = ProcessStats::read() else { return Ok(()) };
        // Counter names without `_total`: the encoder appends it.
        counter(&mut enc, "process_cpu_seconds", "Total user and system CPU time spent in seconds.", s.cpu_seconds)?;
        gauge(&mut enc, "process_resident_memory_bytes", "Resident memory size in bytes.", s.resident_memory_bytes)?;
        gauge(&mut enc, "process_virtual_memory_bytes", "Virtual memory size in bytes.", s.virtual_memory_bytes)?;
        gauge(&mut enc, "process_open_fds", "Number of open file descriptors.", s.open_fds)?;
        if let Some(max) = s.max_fds {
            gauge(&mut enc, "process_max_fds", "Maximum number of open file descriptors.", max)?;
        }
        gauge(
            &mut enc,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            s.start_time_seconds,
        )?;
        gauge(&mut enc, "process_threads", "Number of OS threads in the process.", s.threads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;
    use std::time::{SystemTime, UNIX_EPOCH};

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        // A command name with a space and a parenthesis of its own.
        let text = "4242 (tokio (rt) 1) S 1 4242 4242 0 -1 4194560 1500 0 0 0 250 75 0 0 20 0 7 0 123456 987654321 2048 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        let s = parse_stat(text).unwrap();
        assert_eq!(
            s,
            Stat { utime_ticks: 250, stime_ticks: 75, threads: 7, start_ticks: 123456, vsize_bytes: 987654321, rss_pages: 2048 }
        );
        assert_eq!(parse_stat("4242 (x) S 1 2"), None, "too few fields");
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    #[test]
    fn limits_and_btime() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             95000                95000                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_max_fds(limits), Some(Some(1024)));
        assert_eq!(parse_max_fds("Max open files            unlimited            unlimited            files\n"), Some(None));
        assert_eq!(parse_max_fds("nothing"), None);
        assert_eq!(parse_btime("cpu  1 2 3\nbtime 1764700000\nprocesses 5\n"), Some(1_764_700_000));
    }

    /// Against the real `/proc` of the test process.
    #[test]
    fn reads_this_process() {
        let before = ProcessStats::read().unwrap();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(before.start_time_seconds <= now + 1.0 && before.start_time_seconds > now - 86_400.0 * 365.0, "{before:?}");
        assert!(before.resident_memory_bytes > 0 && before.virtual_memory_bytes >= before.resident_memory_bytes, "{before:?}");
        assert!(before.cpu_seconds >= 0.0 && before.threads >= 1, "{before:?}");
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes one rlimit into a live stack variable.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        let want = (lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur);
        assert_eq!(before.max_fds, want);

        // Ten more descriptors and a thread that waits are seen as such. Other tests run in
        // parallel threads of this process, so only "at least" can be asserted.
        let files: Vec<std::fs::File> = (0..10).map(|_| std::fs::File::open("/proc/self/stat").unwrap()).collect();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || rx.recv());
        let during = ProcessStats::read().unwrap();
        assert!(during.open_fds >= 10 + 3, "{during:?}");
        let in_fd_dir = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
        assert!(during.open_fds.abs_diff(in_fd_dir) <= 4, "{during:?} vs {in_fd_dir} entries");
        assert!(during.threads >= 2, "{during:?}");
        drop(tx);
        t.join().unwrap().unwrap_err();
        drop(files);
        assert!(during.cpu_seconds >= before.cpu_seconds);
    }

    #[test]
    fn renders_every_process_metric() {
        let mut r = Registry::default();
        r.register_collector(Box::new(ProcessCollector));
        let (text, _) = crate::render(&r).unwrap();
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_virtual_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_start_time_seconds ",
            "process_threads ",
        ] {
            assert!(text.lines().any(|l| l.starts_with(name)), "{name} missing in\n{text}");
        }
        assert!(text.contains("# TYPE process_cpu_seconds_total counter\n"), "{text}");
        assert!(!text.contains("_total_total"), "{text}");
    }
}
