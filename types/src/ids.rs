//! Typed identifiers: a `MachineId` cannot be passed where an `AllocationId` is meant.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

#[cfg(feature = "openapi")]
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
#[error("{what} {value:?} is not a UUID (expected the form 8-4-4-4-12 hex digits)")]
pub struct ParseIdError {
    pub what: &'static str,
    pub value: String,
}

macro_rules! uuid_id {
    ($name:ident, $what:literal) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
        #[cfg_attr(feature = "openapi", derive(ToSchema))]
        #[cfg_attr(feature = "openapi", schema(value_type = String, format = Uuid))]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            pub fn new_random() -> Self {
                $name(Uuid::new_v4())
            }
        }

        impl fmt::Display for $name {
            /// Lower-case hyphenated form, as stored and as shown.
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0.hyphenated())
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s.trim()).map($name).map_err(|_| ParseIdError { what: $what, value: s.to_string() })
            }
        }
    };
}

uuid_id!(MachineId, "machine id");
uuid_id!(AllocationId, "allocation id");

impl MachineId {
    /// The same UUID with its first three fields byte-swapped. SMBIOS stores those fields
    /// little-endian, and firmware (PXE option 97, iPXE's `${uuid}`) and the OS (`/sys/class/dmi`)
    /// do not always agree on the order, so a machine may name itself either way.
    pub fn byte_swapped(self) -> MachineId {
        let mut b = self.0.into_bytes();
        b[0..4].reverse();
        b[4..6].reverse();
        b[6..8].reverse();
        MachineId(Uuid::from_bytes(b))
    }

    /// Whether `other` is this UUID in either byte order.
    pub fn same_machine(self, other: MachineId) -> bool {
        self == other || self == other.byte_swapped()
    }
}

/// An image id, `<name>-<version>`.
pub type ImageId = String;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_id_parses_and_prints_lower_case() {
        let id: MachineId = "6B1F2C3D-0000-4000-8000-00000000000A".parse().unwrap();
        assert_eq!(id.to_string(), "6b1f2c3d-0000-4000-8000-00000000000a");
        assert!("not-a-uuid".parse::<MachineId>().is_err());
    }

    #[test]
    fn byte_swapped_smbios_form() {
        let id: MachineId = "00112233-4455-6677-8899-aabbccddeeff".parse().unwrap();
        assert_eq!(id.byte_swapped().to_string(), "33221100-5544-7766-8899-aabbccddeeff");
        assert_eq!(id.byte_swapped().byte_swapped(), id);
        assert!(id.same_machine(id.byte_swapped()) && id.same_machine(id));
        let other: MachineId = "00112233-4455-6677-8899-aabbccddeef0".parse().unwrap();
        assert!(!id.same_machine(other));
    }
}
