//! Counters in the Prometheus text format, for `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

const HELP: &[(&str, &str)] = &[
    ("pixie_dhcp_packets_total", "DHCP packets received, by message type and decision"),
    ("pixie_dhcp_invalid_total", "DHCP packets dropped as malformed, by reason"),
    ("pixie_tftp_transfers_total", "TFTP transfers, by result"),
    ("pixie_tftp_bytes_total", "TFTP payload bytes sent"),
    ("pixie_http_requests_total", "HTTP requests, by route and status"),
    ("pixie_boot_decisions_total", "iPXE script requests, by outcome"),
    ("pixie_boot_decision_source_total", "Boot decisions by where they came from: the API, or another request's call (cache)"),
    ("pixie_pxe_events_total", "PXE Booting events sent to the API, by result"),
];

/// A metric name and its label pairs.
type Key = (&'static str, Vec<(&'static str, String)>);

/// Label values are escaped when rendered; names are fixed strings.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<Key, u64>>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    pub fn add(&self, name: &'static str, labels: &[(&'static str, &str)], n: u64) {
        let key = (name, labels.iter().map(|(k, v)| (*k, v.to_string())).collect());
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        *c.entry(key).or_insert(0) += n;
    }

    pub fn inc(&self, name: &'static str, labels: &[(&'static str, &str)]) {
        self.add(name, labels, 1);
    }

    pub fn get(&self, name: &'static str, labels: &[(&'static str, &str)]) -> u64 {
        let key = (name, labels.iter().map(|(k, v)| (*k, v.to_string())).collect());
        self.counters.lock().unwrap_or_else(|e| e.into_inner()).get(&key).copied().unwrap_or(0)
    }

    pub fn render(&self) -> String {
        let c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        let mut last = "";
        for ((name, labels), value) in c.iter() {
            if *name != last {
                let help = HELP.iter().find(|(n, _)| n == name).map(|(_, h)| *h).unwrap_or("");
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
                last = name;
            }
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {value}");
            } else {
                let _ = writeln!(out, "{name}{{{}}} {value}", labels.join(","));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.inc("pixie_dhcp_packets_total", &[("type", "discover"), ("decision", "offer")]);
        m.inc("pixie_dhcp_packets_total", &[("type", "discover"), ("decision", "offer")]);
        m.add("pixie_tftp_bytes_total", &[], 512);
        m.inc("pixie_http_requests_total", &[("route", "a\"b")]);
        let text = m.render();
        assert!(text.contains("# TYPE pixie_dhcp_packets_total counter"));
        assert!(text.contains("pixie_dhcp_packets_total{type=\"discover\",decision=\"offer\"} 2"));
        assert!(text.contains("pixie_tftp_bytes_total 512"));
        assert!(text.contains("route=\"a\\\"b\""));
    }
}
