//! pixie, the boot service of one partition (network segment).
//!
//! A machine that powers on talks to pixie first: DHCP ([`dhcp`], as the address server or as
//! proxyDHCP beside another one) tells firmware PXE which iPXE binary to fetch over TFTP
//! ([`tftp`]) and tells iPXE the URL of its per-machine script; the script ([`ipxe`], served by
//! [`http`]) comes from the API's boot decision ([`api`]): metal-hammer's kernel and initrd, or
//! the local disk. pixie keeps no state apart from its DHCP leases.
//!
//! The wire handling is pure and tested without sockets: [`dhcp::wire`] and [`dhcp::decide`] for
//! DHCP, [`tftp::codec`] for TFTP, [`ipxe::render`] for scripts. The socket loops only move bytes.

pub mod api;
pub mod config;
pub mod dhcp;
pub mod files;
pub mod http;
pub mod ipxe;
pub mod metrics;
pub mod tftp;
