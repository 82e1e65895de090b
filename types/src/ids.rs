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
                Uuid::parse_str(s.trim())
                    .map($name)
                    .map_err(|_| ParseIdError { what: $what, value: s.to_string() })
            }
        }
    };
}

uuid_id!(MachineId, "machine id");
uuid_id!(AllocationId, "allocation id");

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
}
