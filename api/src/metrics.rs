//! Prometheus metrics at `/metrics`, through `prometheus-client` (`metal-metrics`).
//!
//! - Request counts and latency per route are kept by this instance. Every label is bounded:
//!   the method through [`metal_metrics::method_label`] (`OTHER` for anything unknown), the
//!   route as the router's matched pattern (`/v1/machines/{id}`) or `unmatched`, never the raw
//!   path; the status is a three-digit code.
//! - Machines by state and allocation counts come from the database at scrape time, so every
//!   replica reports the same figures.
//! - `process_*` and `metal_build_info{component="metal-api"}` as every service has them.

use metal_metrics::prometheus_client::metrics::counter::{ConstCounter, Counter};
use metal_metrics::prometheus_client::metrics::family::Family;
use metal_metrics::prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use metal_metrics::prometheus_client::metrics::histogram::Histogram;
use metal_metrics::prometheus_client::registry::Registry;
use metal_types::ProvisioningEvent;

const BUCKETS: [f64; 13] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 60.0];

/// `(method, route)`; the route is a `&'static str` of the route table or `unmatched`.
type RouteLabels = [(&'static str, String); 2];
/// `(method, route, status)`.
type ResponseLabels = [(&'static str, String); 3];

pub struct Metrics {
    latency: Family<RouteLabels, Histogram>,
    responses: Family<ResponseLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics { latency: Family::new_with_constructor(|| Histogram::new(BUCKETS)), responses: Family::default() }
    }
}

/// What the database says at scrape time.
pub struct Snapshot<'a> {
    /// (state or `none`, machines); the state is one of [`ProvisioningEvent`]'s names.
    pub machines_by_state: &'a [(String, i64)],
    pub allocations_total: i64,
    pub allocations_active: i64,
}

/// A state as a label value: one of the event names, anything else `other`.
fn state_label(s: &str) -> &'static str {
    ProvisioningEvent::ALL.iter().map(|e| e.as_str()).find(|n| *n == s).unwrap_or(if s == "none" { "none" } else { "other" })
}

impl Metrics {
    /// Counts one answered request. `route` is the matched route pattern (bounded by the route
    /// table) or `None`; `method` anything a client sent.
    pub fn observe(&self, method: &str, route: Option<&str>, status: u16, seconds: f64) {
        let method = metal_metrics::method_label(method).to_string();
        let route = route.unwrap_or("unmatched").to_string();
        let status = if (100..=999).contains(&status) { status.to_string() } else { "other".to_string() };
        self.latency.get_or_create(&[("method", method.clone()), ("route", route.clone())]).observe(seconds);
        self.responses.get_or_create(&[("method", method), ("route", route), ("status", status)]).inc();
    }

    /// The text of `/metrics` and its content type.
    pub fn render(&self, db: &Snapshot<'_>) -> Result<(String, &'static str), std::fmt::Error> {
        let mut r = Registry::default();
        metal_metrics::build_info(&mut r, "metal-api");
        r.register_collector(Box::new(metal_metrics::ProcessCollector));
        let machines = Family::<[(&'static str, &'static str); 1], Gauge>::default();
        for (state, n) in db.machines_by_state {
            machines.get_or_create(&[("state", state_label(state))]).inc_by(*n);
        }
        r.register("metal_machines", "Machines by provisioning state (last event)", machines);
        r.register("metal_allocations", "Allocations ever made", ConstCounter::new(db.allocations_total.max(0) as u64));
        r.register("metal_allocations_active", "Allocations not freed", ConstGauge::new(db.allocations_active));
        r.register("metal_http_requests", "HTTP responses by route and status", self.responses.clone());
        r.register("metal_http_request_duration_seconds", "HTTP request latency by route", self.latency.clone());
        metal_metrics::render(&r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(m: &Metrics) -> String {
        let states = [("Waiting".to_string(), 3), ("Bogus".to_string(), 1), ("none".to_string(), 2)];
        m.render(&Snapshot { machines_by_state: &states, allocations_total: 5, allocations_active: 2 }).unwrap().0
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_labels_bounded() {
        let m = Metrics::default();
        m.observe("GET", Some("/healthz"), 200, 0.003);
        m.observe("GET", Some("/healthz"), 200, 2.0);
        m.observe("BREW", None, 405, 0.001);
        let text = render(&m);
        assert!(text.contains("metal_machines{state=\"Waiting\"} 3"), "{text}");
        assert!(text.contains("metal_machines{state=\"other\"} 1"), "{text}");
        assert!(text.contains("metal_machines{state=\"none\"} 2"), "{text}");
        let h = "metal_http_request_duration_seconds_bucket{method=\"GET\",route=\"/healthz\",le=";
        assert!(text.contains(&format!("{h}\"0.005\"}} 1")), "{text}");
        assert!(text.contains(&format!("{h}\"5\"}} 2")), "{text}");
        assert!(text.contains(&format!("{h}\"+Inf\"}} 2")), "{text}");
        assert!(text.contains("metal_allocations_total 5"), "{text}");
        assert!(text.contains("metal_allocations_active 2"), "{text}");
        assert!(text.contains("metal_http_requests_total{method=\"OTHER\",route=\"unmatched\",status=\"405\"} 1"), "{text}");
        assert!(!text.contains("BREW"));
    }
}
