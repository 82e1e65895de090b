//! Provisioning events, as every part of the stack names them.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[cfg(feature = "openapi")]
use utoipa::ToSchema;

/// The events a machine goes through. The allowed transitions live in the API
/// (`api/src/fsm.rs`) and are documented in `docs/events.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub enum ProvisioningEvent {
    #[serde(rename = "PXE Booting")]
    PxeBooting,
    #[serde(rename = "Preparing")]
    Preparing,
    #[serde(rename = "Registering")]
    Registering,
    #[serde(rename = "Waiting")]
    Waiting,
    #[serde(rename = "Installing")]
    Installing,
    #[serde(rename = "Booting New Kernel")]
    BootingNewKernel,
    #[serde(rename = "Phoned Home")]
    PhonedHome,
    #[serde(rename = "Alive")]
    Alive,
    #[serde(rename = "Planned Reboot")]
    PlannedReboot,
    #[serde(rename = "Machine Reclaim")]
    MachineReclaim,
    #[serde(rename = "Crashed")]
    Crashed,
}

impl ProvisioningEvent {
    pub const ALL: [ProvisioningEvent; 11] = [
        ProvisioningEvent::PxeBooting,
        ProvisioningEvent::Preparing,
        ProvisioningEvent::Registering,
        ProvisioningEvent::Waiting,
        ProvisioningEvent::Installing,
        ProvisioningEvent::BootingNewKernel,
        ProvisioningEvent::PhonedHome,
        ProvisioningEvent::Alive,
        ProvisioningEvent::PlannedReboot,
        ProvisioningEvent::MachineReclaim,
        ProvisioningEvent::Crashed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProvisioningEvent::PxeBooting => "PXE Booting",
            ProvisioningEvent::Preparing => "Preparing",
            ProvisioningEvent::Registering => "Registering",
            ProvisioningEvent::Waiting => "Waiting",
            ProvisioningEvent::Installing => "Installing",
            ProvisioningEvent::BootingNewKernel => "Booting New Kernel",
            ProvisioningEvent::PhonedHome => "Phoned Home",
            ProvisioningEvent::Alive => "Alive",
            ProvisioningEvent::PlannedReboot => "Planned Reboot",
            ProvisioningEvent::MachineReclaim => "Machine Reclaim",
            ProvisioningEvent::Crashed => "Crashed",
        }
    }
}

impl fmt::Display for ProvisioningEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown provisioning event {0:?}")]
pub struct UnknownEvent(pub String);

impl FromStr for ProvisioningEvent {
    type Err = UnknownEvent;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ProvisioningEvent::ALL.into_iter().find(|e| e.as_str() == s).ok_or_else(|| UnknownEvent(s.to_string()))
    }
}

/// Whether the machine's agent or OS was heard from recently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Liveliness {
    Alive,
    Dead,
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_json_and_from_str() {
        for e in ProvisioningEvent::ALL {
            let json = serde_json::to_string(&e).unwrap();
            assert_eq!(json, format!("\"{}\"", e.as_str()));
            assert_eq!(serde_json::from_str::<ProvisioningEvent>(&json).unwrap(), e);
            assert_eq!(e.as_str().parse::<ProvisioningEvent>().unwrap(), e);
        }
        assert!("Booting".parse::<ProvisioningEvent>().is_err());
    }
}
