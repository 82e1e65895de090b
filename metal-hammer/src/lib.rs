//! metal-hammer: the in-machine agent, `/init` of the metal-hammer initramfs.
//!
//! As PID 1 it mounts the early filesystems, loads the kernel modules the hardware needs,
//! brings up the network with DHCP, takes the hardware inventory, registers with the API, wipes
//! every disk, waits in the warm pool for an allocation, installs the image and kexecs into it
//! ([`flow`]). Every privileged or destructive step goes through [`sys::Sys`], so the order and
//! flags of those steps are unit-tested with [`sys::RecordingSys`].
//!
//! Runtime: [`pid1`], [`modules`], [`net`] ([`netlink`], [`dhcp`]), [`inventory`], [`lldp`],
//! [`wipe`] ([`nvme`]), [`api`], [`flow`], [`console`], [`memwatch`] (peak memory of an install). Install (GPT, mkfs, image stream, OS
//! configuration): `install`.

pub mod api;
pub mod console;
pub mod dhcp;
pub mod flow;
pub mod install;
pub mod inventory;
pub mod lldp;
pub mod memwatch;
pub mod modules;
pub mod net;
pub mod netlink;
pub mod nvme;
pub mod pid1;
pub mod sys;
pub mod tls;
pub mod wipe;

/// Destructive steps are allowed only as PID 1 (inside the initramfs) or on devices the
/// operator named explicitly (`--device`, for tests on loop devices).
pub fn destructive_allowed(devices_named: bool) -> bool {
    devices_named || std::process::id() == 1
}
