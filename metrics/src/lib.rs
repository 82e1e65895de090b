//! Metrics shared by the services of the workspace (pixie, metal-api), on top of the maintained
//! [`prometheus_client`] crate, which is re-exported so every service uses the same version.
//!
//! - [`ProcessCollector`]: the standard `process_*` metrics (CPU, memory, descriptors, threads,
//!   start time), read from `/proc/self` at each scrape.
//! - [`build_info`]: `metal_build_info{component,version} 1`.
//! - [`method_label`]: an HTTP method as a label value from a fixed set (`OTHER` for the rest).
//! - [`render`]: a registry in the Prometheus text format (0.0.4) with its content type.
//!
//! Two rules for the metrics built on this:
//! - **Every label value comes from a fixed set.** Nothing read from a packet or a request goes
//!   into a label except through a mapping like [`method_label`] onto a few values, with
//!   anything unknown mapped to one catch-all value, so no client can grow the number of series.
//!   Label values of type `&'static str` make that easy to check: they can only be literals.
//! - **Counters are registered without `_total`**: the encoder appends it, so a counter
//!   registered as `pixie_dhcp_packets` renders as `pixie_dhcp_packets_total` (registering
//!   `…_total` would render `…_total_total`; debug builds assert against it).
//!
//! ```
//! use metal_metrics::prometheus_client::{metrics::counter::Counter, metrics::family::Family, registry::Registry};
//!
//! let mut registry = Registry::default();
//! metal_metrics::build_info(&mut registry, "example");
//! registry.register_collector(Box::new(metal_metrics::ProcessCollector));
//! let requests = Family::<[(&'static str, &'static str); 1], Counter>::default();
//! registry.register("example_requests", "Requests by method", requests.clone());
//! requests.get_or_create(&[("method", metal_metrics::method_label("BREW"))]).inc();
//! let (text, content_type) = metal_metrics::render(&registry).unwrap();
//! assert!(text.contains("example_requests_total{method=\"OTHER\"} 1"));
//! assert!(text.contains("metal_build_info{component=\"example\","));
//! assert!(content_type.starts_with("text/plain; version=0.0.4"));
//! ```

mod process;

pub use process::{ProcessCollector, ProcessStats};
pub use prometheus_client;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The content type of [`render`]'s text: the Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The workspace version, which every crate of the workspace shares.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Registers `metal_build_info{component="<component>",version="<workspace version>"} 1`, so a
/// dashboard can tell which build of which service answers.
pub fn build_info(registry: &mut Registry, component: &'static str) {
    let info = Family::<[(&'static str, &'static str); 2], Gauge>::default();
    info.get_or_create(&[("component", component), ("version", VERSION)]).set(1);
    registry.register("metal_build_info", "The component and version of this build (always 1)", info);
}

/// An HTTP method as a label value: the methods of RFC 9110 (and `PATCH`) by name, anything
/// else (an extension method or garbage from a client) as `OTHER`. Methods are case-sensitive,
/// so `get` is `OTHER` too.
pub fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "OTHER",
    }
}

/// The registry's metrics as text for a `/metrics` answer, and the content type to send with
/// it ([`CONTENT_TYPE`]). Fails only when a registered [`Collector`](prometheus_client::collector::Collector)
/// fails; [`ProcessCollector`] never does (it leaves out what it cannot read).
pub fn render(registry: &Registry) -> Result<(String, &'static str), std::fmt::Error> {
    let mut text = String::with_capacity(4096);
    prometheus_client::encoding::prometheus_text::encode(&mut text, registry)?;
    Ok((text, CONTENT_TYPE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn methods_map_onto_a_fixed_set() {
        for m in ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"] {
            assert_eq!(method_label(m), m);
        }
        for m in ["get", "BREW", "", "GET ", "PROPFIND", "\u{1F600}"] {
            assert_eq!(method_label(m), "OTHER", "{m:?}");
        }
    }

    #[test]
    fn counters_render_with_one_total_suffix_and_build_info_is_one() {
        let mut r = Registry::default();
        build_info(&mut r, "test");
        let c = Family::<[(&'static str, &'static str); 2], Counter>::default();
        r.register("metal_test_things", "Things", c.clone());
        c.get_or_create(&[("kind", "a"), ("result", "ok")]).inc_by(3);
        let (text, ct) = render(&r).unwrap();
        assert_eq!(ct, CONTENT_TYPE);
        assert!(text.contains("# TYPE metal_test_things_total counter\n"), "{text}");
        assert!(text.contains("metal_test_things_total{kind=\"a\",result=\"ok\"} 3\n"), "{text}");
        assert!(!text.contains("_total_total"), "{text}");
        assert!(text.contains(&format!("metal_build_info{{component=\"test\",version=\"{VERSION}\"}} 1\n")), "{text}");
        assert!(text.contains("# TYPE metal_build_info gauge\n"), "{text}");
    }
}
