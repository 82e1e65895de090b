//! The TLS crypto provider. metal-hammer's reqwest is built without a default provider (no
//! aws-lc in the static binary); [`init`] installs rustls' ring provider process-wide, and
//! must run before any HTTP client is built (`main` calls it first thing).

/// Installs the ring provider as the process default; later calls do nothing.
pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // An error means another provider was installed first: that one serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
