//! Prometheus metrics in the text exposition format, without a metrics library: machines by
//! state and allocation counts come from the database at scrape time (so every replica reports
//! the same), request latency is a histogram per route kept by this instance.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

const BUCKETS: [f64; 13] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 60.0];

#[derive(Default, Clone)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
pub struct Metrics {
    latency: Mutex<BTreeMap<(String, String), Histogram>>,
    responses: Mutex<BTreeMap<(String, String, u16), u64>>,
}

impl Metrics {
    pub fn observe(&self, method: &str, route: &str, status: u16, seconds: f64) {
        {
            let mut map = self.latency.lock().expect("metrics lock");
            let h = map.entry((method.to_string(), route.to_string())).or_default();
            for (i, b) in BUCKETS.iter().enumerate() {
                if seconds <= *b {
                    h.buckets[i] += 1;
                }
            }
            h.count += 1;
            h.sum += seconds;
        }
        *self
            .responses
            .lock()
            .expect("metrics lock")
            .entry((method.to_string(), route.to_string(), status))
            .or_default() += 1;
    }

    pub fn render(&self, machines_by_state: &[(String, i64)], allocations_total: i64, allocations_active: i64) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# HELP metal_machines Machines by provisioning state (last event).");
        let _ = writeln!(s, "# TYPE metal_machines gauge");
        for (state, n) in machines_by_state {
            let _ = writeln!(s, "metal_machines{{state=\"{state}\"}} {n}");
        }
        let _ = writeln!(s, "# HELP metal_allocations_total Allocations ever made.");
        let _ = writeln!(s, "# TYPE metal_allocations_total counter");
        let _ = writeln!(s, "metal_allocations_total {allocations_total}");
        let _ = writeln!(s, "# HELP metal_allocations_active Allocations not freed.");
        let _ = writeln!(s, "# TYPE metal_allocations_active gauge");
        let _ = writeln!(s, "metal_allocations_active {allocations_active}");
        let _ = writeln!(s, "# HELP metal_http_requests_total HTTP responses by route and status.");
        let _ = writeln!(s, "# TYPE metal_http_requests_total counter");
        for ((m, r, st), n) in self.responses.lock().expect("metrics lock").iter() {
            let _ = writeln!(s, "metal_http_requests_total{{method=\"{m}\",route=\"{r}\",status=\"{st}\"}} {n}");
        }
        let _ = writeln!(s, "# HELP metal_http_request_duration_seconds HTTP request latency by route.");
        let _ = writeln!(s, "# TYPE metal_http_request_duration_seconds histogram");
        for ((m, r), h) in self.latency.lock().expect("metrics lock").iter() {
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "metal_http_request_duration_seconds_bucket{{method=\"{m}\",route=\"{r}\",le=\"{b}\"}} {}",
                    h.buckets[i]
                );
            }
            let _ = writeln!(s, "metal_http_request_duration_seconds_bucket{{method=\"{m}\",route=\"{r}\",le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(s, "metal_http_request_duration_seconds_sum{{method=\"{m}\",route=\"{r}\"}} {}", h.sum);
            let _ = writeln!(s, "metal_http_request_duration_seconds_count{{method=\"{m}\",route=\"{r}\"}} {}", h.count);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.observe("GET", "/healthz", 200, 0.003);
        m.observe("GET", "/healthz", 200, 2.0);
        let text = m.render(&[("Waiting".into(), 3)], 5, 2);
        assert!(text.contains("metal_machines{state=\"Waiting\"} 3"));
        assert!(text.contains("le=\"0.005\"} 1"));
        assert!(text.contains("le=\"5\"} 2"));
        assert!(text.contains("le=\"+Inf\"} 2"));
        assert!(text.contains("metal_allocations_total 5"));
    }
}
