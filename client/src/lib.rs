//! What every client of the metal API shares.
//!
//! - [`tls`]: ring as the one rustls crypto provider of the workspace, CA bundles read from PEM
//!   files (errors name the file), [`tls::Roots`] (the platform's trust store or exactly one
//!   bundle) and rustls client configs for programs without reqwest (phone-home).
//! - [`http`] (feature `http`, on by default): the reqwest client metalctl, pixie, metal-hammer
//!   and the lab build, trusting [`tls::Roots`], with connect and request timeouts.
//! - [`api`] (feature `api`): the typed client of the API, one function per route.
//! - `sim` (feature `sim`): a simulated metal-hammer on [`api`], for tests and the scale simulator.
//! - `ca` (feature `ca`): a throwaway CA and server certificates for the lab and tests.
//!
//! pixie, metalctl, metal-hammer, phone-home, the lab and the API's tests use it, so they cannot
//! disagree on how an API certificate is checked or how a route is called.

pub mod tls;

#[cfg(feature = "http")]
pub mod http;

#[cfg(feature = "api")]
pub mod api;

#[cfg(feature = "sim")]
pub mod sim;

#[cfg(any(test, feature = "ca"))]
pub mod ca;
