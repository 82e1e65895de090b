//! The `metal.*` kernel command-line parameters that carry metal-hammer's configuration.
//!
//! The API renders them into the boot decision; metal-hammer parses them from `/proc/cmdline`.
//! Pure functions, no I/O.

use std::collections::BTreeMap;

/// What metal-hammer needs to know from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HammerParams {
    /// `metal.api=http://10.99.0.1:8080`
    pub api_url: String,
    /// `metal.token=…`: the short-lived enrolment token.
    pub enrolment_token: String,
    /// `metal.partition=lab`
    pub partition: String,
    /// `metal.lldp=5`: seconds to listen for LLDP neighbours (default 0: do not listen).
    pub lldp_seconds: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("kernel command line has no {0}=… parameter; boot metal-hammer through pixie, which adds it")]
    Missing(&'static str),
    #[error("kernel command line parameter {key} has an invalid value {value:?}")]
    Invalid { key: &'static str, value: String },
    #[error("value for {0} contains whitespace or a quote, which the kernel command line cannot carry")]
    Unencodable(&'static str),
}

/// Splits a kernel command line into `key=value` words, honouring double quotes the way the
/// kernel does (`key="a b"`). Words without `=` map to an empty value.
pub fn split(cmdline: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_quotes = false;
    let mut push = |word: &mut String| {
        if !word.is_empty() {
            let (k, v) = match word.split_once('=') {
                Some((k, v)) => (k.to_string(), v.replace('"', "")),
                None => (word.replace('"', ""), String::new()),
            };
            out.push((k, v));
            word.clear();
        }
    };
    for c in cmdline.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                word.push(c);
            }
            c if c.is_whitespace() && !in_quotes => push(&mut word),
            c => word.push(c),
        }
    }
    push(&mut word);
    out
}

impl HammerParams {
    pub fn parse(cmdline: &str) -> Result<HammerParams, CmdlineError> {
        let map: BTreeMap<String, String> = split(cmdline).into_iter().collect();
        let get = |key: &'static str| -> Result<String, CmdlineError> {
            map.get(key).filter(|v| !v.is_empty()).cloned().ok_or(CmdlineError::Missing(key))
        };
        let lldp_seconds = match map.get("metal.lldp") {
            None => 0,
            Some(v) => v.parse().map_err(|_| CmdlineError::Invalid { key: "metal.lldp", value: v.clone() })?,
        };
        let api_url = get("metal.api")?;
        let trimmed = api_url.trim_end_matches('/');
        if !(trimmed.starts_with("http://") || trimmed.starts_with("https://")) {
            return Err(CmdlineError::Invalid { key: "metal.api", value: api_url });
        }
        Ok(HammerParams {
            api_url: trimmed.to_string(),
            enrolment_token: get("metal.token")?,
            partition: get("metal.partition")?,
            lldp_seconds,
        })
    }

    /// Renders the parameters as command-line words, to append to a partition's base cmdline.
    pub fn encode(&self) -> Result<String, CmdlineError> {
        let check = |key: &'static str, v: &str| {
            if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c == '"') {
                Err(CmdlineError::Unencodable(key))
            } else {
                Ok(())
            }
        };
        check("metal.api", &self.api_url)?;
        check("metal.token", &self.enrolment_token)?;
        check("metal.partition", &self.partition)?;
        let mut s = format!("metal.api={} metal.token={} metal.partition={}", self.api_url, self.enrolment_token, self.partition);
        if self.lldp_seconds > 0 {
            s.push_str(&format!(" metal.lldp={}", self.lldp_seconds));
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_encode_round_trip() {
        let p = HammerParams {
            api_url: "http://10.99.0.1:8080".into(),
            enrolment_token: "enr_abc123".into(),
            partition: "lab".into(),
            lldp_seconds: 3,
        };
        let line = format!("console=ttyS0 quiet {} panic=10", p.encode().unwrap());
        assert_eq!(HammerParams::parse(&line).unwrap(), p);
    }

    #[test]
    fn quotes_and_missing_values() {
        let words = split(r#"a=1 b="x y" c"#);
        assert_eq!(words, vec![("a".into(), "1".into()), ("b".into(), "x y".into()), ("c".into(), "".into())]);
        assert_eq!(HammerParams::parse("metal.api=http://x metal.partition=p"), Err(CmdlineError::Missing("metal.token")));
        assert!(matches!(
            HammerParams::parse("metal.api=ftp://x metal.token=t metal.partition=p"),
            Err(CmdlineError::Invalid { .. })
        ));
        // Found by metal-hammer's `cmdline` fuzz target: the URL is checked after the trailing
        // `/` are trimmed, so a URL with no host is refused rather than parsed as `http:`.
        for url in ["http://", "http:///", "https:////"] {
            let line = format!("metal.api={url} metal.token=t metal.partition=p");
            assert_eq!(HammerParams::parse(&line), Err(CmdlineError::Invalid { key: "metal.api", value: url.into() }), "{url}");
        }
        assert_eq!(HammerParams::parse("metal.api=http://x/ metal.token=t metal.partition=p").unwrap().api_url, "http://x");
        let bad =
            HammerParams { api_url: "http://x".into(), enrolment_token: "a b".into(), partition: "p".into(), lldp_seconds: 0 };
        assert_eq!(bad.encode(), Err(CmdlineError::Unencodable("metal.token")));
    }
}
