//! pixie's metrics for `/metrics`, on `prometheus-client` (through `metal-metrics`, which adds
//! the `process_*` metrics and `metal_build_info`).
//!
//! Every label value is a `&'static str`, so it can only be one of the literals in pixie's code:
//! nothing from a packet or a request reaches a label except through a fixed mapping (message
//! types, HTTP routes and statuses, reasons), with anything unknown mapped to `other`. A client
//! cannot create new series. Names are registered without `_total`; the encoder appends it.

use metal_metrics::prometheus_client::metrics::counter::Counter;
use metal_metrics::prometheus_client::metrics::family::Family;
use metal_metrics::prometheus_client::metrics::gauge::Gauge;
use metal_metrics::prometheus_client::registry::Registry;

/// Label pairs with values from a fixed set.
pub type Labels<const N: usize> = [(&'static str, &'static str); N];

/// A counter family with `N` fixed label names; [`Counters::inc`] takes the values in the
/// order of the names.
#[derive(Debug, Clone)]
pub struct Counters<const N: usize> {
    keys: [&'static str; N],
    family: Family<Labels<N>, Counter>,
}

impl<const N: usize> Counters<N> {
    fn register(registry: &mut Registry, name: &'static str, help: &'static str, keys: [&'static str; N]) -> Counters<N> {
        let family = Family::<Labels<N>, Counter>::default();
        registry.register(name, help, family.clone());
        Counters { keys, family }
    }

    fn labels(&self, values: [&'static str; N]) -> Labels<N> {
        let mut l = [("", ""); N];
        for ((slot, k), v) in l.iter_mut().zip(self.keys).zip(values) {
            *slot = (k, v);
        }
        l
    }

    pub fn inc(&self, values: [&'static str; N]) {
        self.add(values, 1);
    }

    pub fn add(&self, values: [&'static str; N], n: u64) {
        self.family.get_or_create(&self.labels(values)).inc_by(n);
    }

    /// The current value (0 for a series never counted).
    pub fn get(&self, values: [&'static str; N]) -> u64 {
        self.family.get(&self.labels(values)).map(|c| c.get()).unwrap_or(0)
    }
}

/// Every metric pixie keeps. Cheap to share (`Arc<Metrics>`); all updates are atomic.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `type` (discover, request, decline, release, inform, other) × `decision` (offer, ack,
    /// nak, silent, journal_error).
    pub dhcp_packets: Counters<2>,
    /// `reason`: why a packet was dropped as malformed.
    pub dhcp_invalid: Counters<1>,
    /// fsyncs of the lease journal (one covers every ACK of a group).
    pub dhcp_journal_syncs: Counter,
    /// Rewrites of the lease journal down to the live leases.
    pub dhcp_journal_compactions: Counter,
    /// `result` of every transfer that started.
    pub tftp_transfers: Counters<1>,
    /// `reason` an RRQ was dropped before a transfer started: limit, client_limit, duplicate.
    pub tftp_refused: Counters<1>,
    pub tftp_bytes: Counter,
    /// Transfers running now.
    pub tftp_active: Gauge,
    /// `route` × `status`, both paths of the HTTP server alike.
    pub http_requests: Counters<2>,
    /// Connections open now.
    pub http_connections: Gauge,
    /// Connections closed at once because `http.max_connections` were open.
    pub http_connections_refused: Counter,
    /// `phase` in which a connection was closed for a timeout: idle, head, write.
    pub http_timeouts: Counters<1>,
    /// `outcome` of `/ipxe`: hammer, local_disk, retry, bad_request.
    pub boot_decisions: Counters<1>,
    /// `source` of an answer: api, shared.
    pub boot_decision_source: Counters<1>,
    /// `result`: sent, failed, dropped (queue full), suppressed (per-MAC rate limit).
    pub pxe_events: Counters<1>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut r = Registry::default();
        metal_metrics::build_info(&mut r, "pixie");
        r.register_collector(Box::new(metal_metrics::ProcessCollector));
        let counter = |r: &mut Registry, name: &'static str, help: &'static str| {
            let c = Counter::default();
            r.register(name, help, c.clone());
            c
        };
        let gauge = |r: &mut Registry, name: &'static str, help: &'static str| {
            let g = Gauge::default();
            r.register(name, help, g.clone());
            g
        };
        Metrics {
            dhcp_packets: Counters::register(
                &mut r,
                "pixie_dhcp_packets",
                "DHCP packets received, by message type and decision",
                ["type", "decision"],
            ),
            dhcp_invalid: Counters::register(
                &mut r,
                "pixie_dhcp_invalid",
                "DHCP packets dropped as malformed, by reason",
                ["reason"],
            ),
            dhcp_journal_syncs: counter(
                &mut r,
                "pixie_dhcp_journal_syncs",
                "fsyncs of the lease journal, each before the ACKs it covers leave",
            ),
            dhcp_journal_compactions: counter(
                &mut r,
                "pixie_dhcp_journal_compactions",
                "Rewrites of the lease journal down to the live leases",
            ),
            tftp_transfers: Counters::register(&mut r, "pixie_tftp_transfers", "TFTP transfers, by result", ["result"]),
            tftp_refused: Counters::register(
                &mut r,
                "pixie_tftp_refused",
                "TFTP read requests dropped before a transfer started, by reason",
                ["reason"],
            ),
            tftp_bytes: counter(&mut r, "pixie_tftp_bytes", "TFTP payload bytes sent"),
            tftp_active: gauge(&mut r, "pixie_tftp_transfers_active", "TFTP transfers running now"),
            http_requests: Counters::register(
                &mut r,
                "pixie_http_requests",
                "HTTP requests, by route and status",
                ["route", "status"],
            ),
            http_connections: gauge(&mut r, "pixie_http_connections", "HTTP connections open now"),
            http_connections_refused: counter(
                &mut r,
                "pixie_http_connections_refused",
                "HTTP connections closed at once because http.max_connections were open",
            ),
            http_timeouts: Counters::register(
                &mut r,
                "pixie_http_timeouts",
                "HTTP connections closed for a timeout, by phase",
                ["phase"],
            ),
            boot_decisions: Counters::register(&mut r, "pixie_boot_decisions", "iPXE script requests, by outcome", ["outcome"]),
            boot_decision_source: Counters::register(
                &mut r,
                "pixie_boot_decision_source",
                "Boot decisions by where they came from: the API, or another request's call (cache)",
                ["source"],
            ),
            pxe_events: Counters::register(
                &mut r,
                "pixie_pxe_events",
                "PXE Booting events, by result (suppressed: rate limit per MAC)",
                ["result"],
            ),
            registry: r,
        }
    }
}

impl Metrics {
    /// The text for `/metrics` and its content type.
    pub fn render(&self) -> (String, &'static str) {
        // Only ProcessCollector is registered as a collector, and it never fails.
        metal_metrics::render(&self.registry).unwrap_or_else(|_| (String::new(), metal_metrics::CONTENT_TYPE))
    }
}

/// An HTTP status as a label value: the statuses pixie, axum, tower-http and hyper answer with;
/// anything else is `other`.
pub fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        204 => "204",
        206 => "206",
        301 => "301",
        302 => "302",
        304 => "304",
        307 => "307",
        308 => "308",
        400 => "400",
        403 => "403",
        404 => "404",
        405 => "405",
        408 => "408",
        411 => "411",
        412 => "412",
        413 => "413",
        414 => "414",
        416 => "416",
        431 => "431",
        500 => "500",
        501 => "501",
        502 => "502",
        503 => "503",
        504 => "504",
        505 => "505",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_the_old_names() {
        let m = Metrics::default();
        m.dhcp_packets.inc(["discover", "offer"]);
        m.dhcp_packets.inc(["discover", "offer"]);
        m.tftp_bytes.inc_by(512);
        m.http_requests.inc(["hammer", status_label(206)]);
        m.http_requests.inc(["other", status_label(299)]);
        m.pxe_events.inc(["suppressed"]);
        let (text, content_type) = m.render();
        assert!(content_type.starts_with("text/plain; version=0.0.4"));
        assert!(text.contains("# TYPE pixie_dhcp_packets_total counter"), "{text}");
        assert!(text.contains("pixie_dhcp_packets_total{type=\"discover\",decision=\"offer\"} 2\n"), "{text}");
        assert!(text.contains("pixie_tftp_bytes_total 512\n"), "{text}");
        assert!(text.contains("pixie_http_requests_total{route=\"hammer\",status=\"206\"} 1\n"), "{text}");
        assert!(text.contains("pixie_http_requests_total{route=\"other\",status=\"other\"} 1\n"), "{text}");
        assert!(text.contains("pixie_pxe_events_total{result=\"suppressed\"} 1\n"), "{text}");
        assert!(text.contains("pixie_tftp_transfers_active 0\n"), "{text}");
        assert!(text.contains("metal_build_info{component=\"pixie\",version=\""), "{text}");
        assert!(text.contains("\nprocess_open_fds "), "{text}");
        assert!(!text.contains("_total_total"), "{text}");
        assert_eq!(m.dhcp_packets.get(["discover", "offer"]), 2);
        assert_eq!(m.dhcp_packets.get(["request", "ack"]), 0);
    }

    #[test]
    fn statuses_map_onto_a_fixed_set() {
        assert_eq!(status_label(404), "404");
        for odd in [0, 99, 299, 418, 599, 999, u16::MAX] {
            assert_eq!(status_label(odd), "other");
        }
    }
}
