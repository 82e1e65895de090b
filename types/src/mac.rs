//! MAC addresses: parsed once, one canonical form.
//!
//! [`Mac`] accepts the spellings operators and firmware use — `52:54:00:12:34:56`,
//! `52-54-00-12-34-56` (Windows, iPXE's `${net0/mac:hexhyp}`), `5254.0012.3456` (switches) and
//! `525400123456` — in any letter case, with surrounding whitespace, and always prints the
//! lower-case, colon-separated form. On the wire (serde) it is that string, so JSON bodies and
//! database columns hold one spelling and two spellings of one NIC can never be two machines.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A 48-bit MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a MAC address (expected six hex bytes like 52:54:00:12:34:56)")]
pub struct ParseMacError {
    pub value: String,
}

impl Mac {
    pub fn octets(self) -> [u8; 6] {
        self.0
    }

    /// Whether the locally-administered bit is set (a MAC a VM or a tool made up, not a vendor's).
    pub fn is_local(self) -> bool {
        self.0[0] & 0x02 != 0
    }

    /// Whether this is a multicast (or the broadcast) address: never a NIC's own.
    pub fn is_multicast(self) -> bool {
        self.0[0] & 0x01 != 0
    }
}

impl fmt::Display for Mac {
    /// Lower case, colon separated: `52:54:00:12:34:56`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

fn hex_digits(s: &str) -> Option<[u8; 6]> {
    if s.len() != 12 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 6];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl FromStr for Mac {
    type Err = ParseMacError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let err = || ParseMacError { value: s.to_string() };
        let groups: Vec<&str> = t.split([':', '-', '.']).collect();
        let ok = match groups.len() {
            // 52:54:00:12:34:56 or 52-54-00-12-34-56, one separator kind throughout.
            6 => groups.iter().all(|g| g.len() == 2) && (t.matches(':').count() == 5 || t.matches('-').count() == 5),
            // 5254.0012.3456
            3 => groups.iter().all(|g| g.len() == 4) && t.matches('.').count() == 2,
            // 525400123456
            1 => true,
            _ => false,
        };
        if !ok {
            return Err(err());
        }
        hex_digits(&groups.concat()).map(Mac).ok_or_else(err)
    }
}

impl From<[u8; 6]> for Mac {
    fn from(b: [u8; 6]) -> Mac {
        Mac(b)
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Mac {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some(
                "MAC address, lower case and colon separated (52:54:00:12:34:56); other spellings are accepted on input",
            ))
            .examples(["52:54:00:12:34:56"])
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Mac {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_is_one_mac() {
        let m = Mac([0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);
        for s in [
            "52:54:00:ab:cd:ef",
            "52:54:00:AB:CD:EF",
            "52-54-00-ab-cd-ef",
            "5254.00ab.cdef",
            "525400ABCDEF",
            " 52:54:00:ab:cd:ef\n",
        ] {
            assert_eq!(s.parse::<Mac>(), Ok(m), "{s:?}");
        }
        assert_eq!(m.to_string(), "52:54:00:ab:cd:ef");
    }

    #[test]
    fn not_macs() {
        for s in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "52:54:00:ab:cd:eg",
            "52:54-00:ab:cd:ef",
            "5:54:00:ab:cd:ef0",
            "+2:54:00:ab:cd:ef",
            "52545400abcdef",
            "5254.00ab.cde",
            "52.54.00.ab.cd.ef",
            "52:54:00:ab:cd:é",
        ] {
            assert!(s.parse::<Mac>().is_err(), "{s:?}");
        }
        let e = "nope".parse::<Mac>().unwrap_err();
        assert!(e.to_string().contains("52:54:00:12:34:56"), "{e}");
    }

    #[test]
    fn serde_is_the_canonical_string() {
        let m: Mac = serde_json::from_str("\"52-54-00-AB-CD-EF\"").unwrap();
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"52:54:00:ab:cd:ef\"");
        assert!(serde_json::from_str::<Mac>("\"x\"").is_err());
        assert!(serde_json::from_str::<Mac>("7").is_err());
    }

    #[test]
    fn bits() {
        assert!(Mac([0x52, 0, 0, 0, 0, 1]).is_local());
        assert!(!Mac([0x00, 0x1b, 0x21, 0, 0, 1]).is_local());
        assert!(Mac([0xff; 6]).is_multicast());
    }

    proptest::proptest! {
        #[test]
        fn display_parse_round_trip(b: [u8; 6]) {
            let m = Mac(b);
            proptest::prop_assert_eq!(m.to_string().parse::<Mac>(), Ok(m));
            proptest::prop_assert_eq!(m.to_string().to_uppercase().replace(':', "-").parse::<Mac>(), Ok(m));
        }

        #[test]
        fn parse_never_panics(s: String) {
            let _ = s.parse::<Mac>();
        }
    }
}
