//! Stateless enrolment tokens.
//!
//! A boot decision hands metal-hammer a token for `POST /v1/agent/register` without writing
//! anything: the token carries its own claims and an HMAC over them.
//!
//! ```text
//! enr1.<base64url(JSON claims)>.<base64url(HMAC-SHA256(key, "enr1." + base64url(JSON claims)))>
//! ```
//!
//! The claims bind the token to a partition and (when pixie saw one) the MAC address that PXE
//! booted, and say when it expires; a random nonce makes every token distinct. The key is one
//! random 32-byte value in the `secrets` table, shared by all replicas (see [`Key`]). A token is
//! good for any number of registrations until it expires, as the stored tokens before it were:
//! metal-hammer retries a failed registration with the same token, and a boot service may hand the
//! same decision to the repeated requests of one boot.
//!
//! Everything here is pure; [`crate::auth`] calls [`verify`], [`crate::http`] calls [`issue`] and
//! [`check_binding`].

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use metal_types::MachineId;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// The version prefix of stateless enrolment tokens (database-stored ones start with `enr_`).
pub const PREFIX: &str = "enr1.";

/// The name of the key's row in the `secrets` table.
pub const KEY_NAME: &str = "enrolment_hmac_sha256";

/// The HMAC key. Its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(…)")
    }
}

impl Key {
    pub fn random() -> Key {
        let mut k = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k);
        Key(k)
    }

    /// The stored form: 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Key> {
        let v = hex::decode(s.trim()).ok()?;
        Some(Key(v.try_into().ok()?))
    }

    /// HMAC-SHA256 of `data` under this key (phone-home tokens; keep `data` domain-separated).
    pub fn sign(&self, data: &[u8]) -> [u8; 32] {
        self.mac(data)
    }

    fn mac(&self, signed: &[u8]) -> [u8; 32] {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        m.update(signed);
        m.finalize().into_bytes().into()
    }
}

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// The partition the machine booted in.
    #[serde(rename = "p")]
    pub partition: String,
    /// The MAC that PXE booted (lower case, colon separated), when pixie sent one.
    #[serde(rename = "m", default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The machine the token was issued for: the one that owns the MAC, or else the UUID the
    /// boot request named. Registration must be for this machine, in either SMBIOS byte order
    /// (firmware and the OS do not always agree on it): see [`check_machine`].
    #[serde(rename = "u", default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<MachineId>,
    /// Milliseconds since the epoch after which the token is refused.
    #[serde(rename = "e")]
    pub expires_ms: i64,
    /// 16 random bytes, hex.
    #[serde(rename = "n")]
    pub nonce: String,
}

impl Claims {
    /// Claims with a fresh nonce.
    pub fn new(partition: &str, mac: Option<String>, machine: Option<MachineId>, expires_ms: i64) -> Claims {
        let nonce: [u8; 16] = rand::random();
        Claims { partition: partition.to_string(), mac, machine, expires_ms, nonce: hex::encode(nonce) }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the enrolment token is malformed")]
    Malformed,
    #[error("the enrolment token's signature does not match (altered, or signed with a key that was rotated since)")]
    BadSignature,
    #[error("the enrolment token expired")]
    Expired { expires_ms: i64 },
}

/// Signs `claims`.
pub fn issue(key: &Key, claims: &Claims) -> String {
    let payload = B64.encode(serde_json::to_vec(claims).expect("claims always serialize"));
    let mut token = String::with_capacity(PREFIX.len() + payload.len() + 1 + 43);
    token.push_str(PREFIX);
    token.push_str(&payload);
    let mac = key.mac(token.as_bytes());
    token.push('.');
    token.push_str(&B64.encode(mac));
    token
}

/// Checks the signature (in constant time), then the expiry at `now_ms`.
pub fn verify(key: &Key, token: &str, now_ms: i64) -> Result<Claims, TokenError> {
    let rest = token.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
    let (payload, sig) = rest.split_once('.').ok_or(TokenError::Malformed)?;
    let sig = B64.decode(sig).map_err(|_| TokenError::Malformed)?;
    let signed = &token[..PREFIX.len() + payload.len()];
    let expected = key.mac(signed.as_bytes());
    if sig.len() != expected.len() || !bool::from(expected.ct_eq(&sig)) {
        return Err(TokenError::BadSignature);
    }
    let json = B64.decode(payload).map_err(|_| TokenError::Malformed)?;
    let claims: Claims = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
    if claims.expires_ms <= now_ms {
        return Err(TokenError::Expired { expires_ms: claims.expires_ms });
    }
    Ok(claims)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    #[error("the enrolment token was issued for partition {token}, not {requested}")]
    Partition { token: String, requested: String },
    #[error(
        "the enrolment token was issued to the machine that PXE booted with MAC {mac}, but the inventory has no NIC \
         with that MAC; PXE boot this machine for its own token"
    )]
    Mac { mac: metal_types::Mac },
    #[error(
        "the enrolment token was issued to machine UUID {token}, but this registration is for {registering}; PXE boot \
         this machine for its own token (if a NIC moved between machines, an operator must decommission the old one first)"
    )]
    Machine { token: MachineId, registering: MachineId },
}

/// Whether a registration for `partition` with an inventory holding `nic_macs` may use a token
/// bound to `token_partition` and `token_mac` (`None`: not bound).
pub fn check_binding<'a>(
    token_partition: Option<&str>,
    token_mac: Option<metal_types::Mac>,
    partition: &str,
    nic_macs: impl IntoIterator<Item = &'a str>,
) -> Result<(), BindingError> {
    if let Some(tp) = token_partition {
        if tp != partition {
            return Err(BindingError::Partition { token: tp.to_string(), requested: partition.to_string() });
        }
    }
    if let Some(mac) = token_mac {
        if !nic_macs.into_iter().any(|n| n.parse::<metal_types::Mac>().ok() == Some(mac)) {
            return Err(BindingError::Mac { mac });
        }
    }
    Ok(())
}

/// Whether a registration of `registering` may use a token issued for `claimed` (`None`: the
/// boot request named no machine and the MAC was unknown, so any new machine may enrol).
pub fn check_machine(claimed: Option<MachineId>, registering: MachineId) -> Result<(), BindingError> {
    match claimed {
        Some(c) if !c.same_machine(registering) => Err(BindingError::Machine { token: c, registering }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn claims() -> Claims {
        Claims::new("lab", Some("52:54:00:12:34:56".into()), Some(MachineId::new_random()), NOW + 60_000)
    }

    fn parts(t: &str) -> (String, String) {
        let rest = t.strip_prefix(PREFIX).unwrap();
        let (p, s) = rest.split_once('.').unwrap();
        (p.to_string(), s.to_string())
    }

    /// Flips one bit of the decoded bytes of a base64url part and re-encodes it.
    fn flip(part: &str, byte: usize) -> String {
        let mut v = B64.decode(part).unwrap();
        v[byte] ^= 0x01;
        B64.encode(v)
    }

    #[test]
    fn round_trip_and_distinct_tokens() {
        let key = Key::random();
        let c = claims();
        let t = issue(&key, &c);
        assert!(t.starts_with(PREFIX));
        assert!(!t.chars().any(|ch| ch.is_whitespace() || ch == '"'), "token must fit a kernel command line: {t}");
        assert_eq!(verify(&key, &t, NOW).unwrap(), c);
        let again = Claims { nonce: Claims::new("lab", None, None, 0).nonce, ..c.clone() };
        assert_ne!(issue(&key, &again), t, "the nonce makes tokens distinct");
    }

    #[test]
    fn tampered_payload_is_refused() {
        let key = Key::random();
        let t = issue(&key, &claims());
        let (p, s) = parts(&t);
        // Any altered byte of the payload.
        for i in 0..B64.decode(&p).unwrap().len() {
            let bad = format!("{PREFIX}{}.{s}", flip(&p, i));
            assert_eq!(verify(&key, &bad, NOW), Err(TokenError::BadSignature), "payload byte {i}");
        }
        // A payload re-signed claims of another partition, but with the old signature.
        let other = Claims { partition: "other".into(), ..verify(&key, &t, NOW).unwrap() };
        let (p2, _) = parts(&issue(&key, &other));
        assert_eq!(verify(&key, &format!("{PREFIX}{p2}.{s}"), NOW), Err(TokenError::BadSignature));
    }

    #[test]
    fn tampered_signature_is_refused() {
        let key = Key::random();
        let t = issue(&key, &claims());
        let (p, s) = parts(&t);
        for i in 0..32 {
            let bad = format!("{PREFIX}{p}.{}", flip(&s, i));
            assert_eq!(verify(&key, &bad, NOW), Err(TokenError::BadSignature), "signature byte {i}");
        }
        // Truncated, extended, missing.
        let short = B64.encode(&B64.decode(&s).unwrap()[..31]);
        assert_eq!(verify(&key, &format!("{PREFIX}{p}.{short}"), NOW), Err(TokenError::BadSignature));
        let long = B64.encode([B64.decode(&s).unwrap(), vec![0]].concat());
        assert_eq!(verify(&key, &format!("{PREFIX}{p}.{long}"), NOW), Err(TokenError::BadSignature));
        assert_eq!(verify(&key, &format!("{PREFIX}{p}."), NOW), Err(TokenError::BadSignature));
        assert_eq!(verify(&key, &format!("{PREFIX}{p}"), NOW), Err(TokenError::Malformed));
        assert_eq!(verify(&key, &format!("{PREFIX}{p}.not*base64"), NOW), Err(TokenError::Malformed));
    }

    #[test]
    fn tampered_prefix_is_refused() {
        let key = Key::random();
        let t = issue(&key, &claims());
        let rest = t.strip_prefix(PREFIX).unwrap();
        for prefix in ["enr2.", "enr_", "", "ENR1."] {
            assert!(verify(&key, &format!("{prefix}{rest}"), NOW).is_err(), "prefix {prefix:?}");
        }
        // The prefix is part of what is signed: a token under another version is not this one.
        let (p, s) = parts(&t);
        let signed_as_v2 = format!("enr2.{p}");
        assert_ne!(B64.encode(key.mac(signed_as_v2.as_bytes())), s);
    }

    #[test]
    fn wrong_key_is_refused() {
        let t = issue(&Key::random(), &claims());
        assert_eq!(verify(&Key::random(), &t, NOW), Err(TokenError::BadSignature));
    }

    #[test]
    fn expiry() {
        let key = Key::random();
        let c = claims();
        let t = issue(&key, &c);
        assert!(verify(&key, &t, c.expires_ms - 1).is_ok());
        assert_eq!(verify(&key, &t, c.expires_ms), Err(TokenError::Expired { expires_ms: c.expires_ms }));
        assert_eq!(verify(&key, &t, c.expires_ms + 3_600_000), Err(TokenError::Expired { expires_ms: c.expires_ms }));
    }

    #[test]
    fn signed_garbage_is_malformed_not_accepted() {
        let key = Key::random();
        // Correctly signed, but not claims (as if the key had leaked into another use).
        let payload = B64.encode(br#"{"p":"lab","e":1,"n":"x","admin":true}"#);
        let signed = format!("{PREFIX}{payload}");
        let t = format!("{signed}.{}", B64.encode(key.mac(signed.as_bytes())));
        assert_eq!(verify(&key, &t, 0), Err(TokenError::Malformed));
    }

    #[test]
    fn key_hex_round_trip() {
        let k = Key::random();
        assert_eq!(Key::from_hex(&k.to_hex()), Some(k.clone()));
        assert_eq!(Key::from_hex("abcd"), None);
        assert_eq!(Key::from_hex(&"zz".repeat(32)), None);
        assert_eq!(format!("{k:?}"), "Key(…)");
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        // Key "Jefe" does not fit our 32-byte type; check the primitive the same way we call it.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(b"Jefe").unwrap();
        m.update(b"what do ya want for nothing?");
        assert_eq!(hex::encode(m.finalize().into_bytes()), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn binding_machine_in_either_byte_order() {
        let m: MachineId = "00112233-4455-6677-8899-aabbccddeeff".parse().unwrap();
        assert_eq!(check_machine(Some(m), m), Ok(()));
        assert_eq!(check_machine(Some(m.byte_swapped()), m), Ok(()));
        assert_eq!(check_machine(None, m), Ok(()));
        let other = MachineId::new_random();
        let e = check_machine(Some(other), m).unwrap_err();
        assert_eq!(e, BindingError::Machine { token: other, registering: m });
        assert!(e.to_string().contains(&other.to_string()), "{e}");
    }

    #[test]
    fn binding_partition_and_mac() {
        let mac = Some("52:54:00:12:34:56".parse().unwrap());
        assert_eq!(check_binding(Some("lab"), mac, "lab", ["52:54:00:12:34:56"]), Ok(()));
        // NIC MACs compare normalised.
        assert_eq!(check_binding(Some("lab"), mac, "lab", ["aa:bb:cc:dd:ee:ff", " 52-54-00-12-34-56 "]), Ok(()));
        assert_eq!(
            check_binding(Some("lab"), mac, "lab2", ["52:54:00:12:34:56"]),
            Err(BindingError::Partition { token: "lab".into(), requested: "lab2".into() })
        );
        let wrong = check_binding(Some("lab"), mac, "lab", ["52:54:00:12:34:57"]).unwrap_err();
        assert_eq!(wrong, BindingError::Mac { mac: "52:54:00:12:34:56".parse().unwrap() });
        assert!(wrong.to_string().contains("MAC 52:54:00:12:34:56"), "{wrong}");
        assert!(check_binding(Some("lab"), mac, "lab", []).is_err(), "no NICs, no match");
        // Unbound tokens (old stored ones without a MAC) check only what they carry.
        assert_eq!(check_binding(Some("lab"), None, "lab", []), Ok(()));
        assert_eq!(check_binding(None, None, "any", []), Ok(()));
    }
}
