//! Where the API URL, the token and the CA bundle come from: flags, then the environment, then
//! the config file (`~/.config/metalctl/config.yaml` unless `--config` names another).

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const ENV_API_URL: &str = "METAL_API_URL";
pub const ENV_TOKEN: &str = "METAL_TOKEN";
pub const ENV_CA_FILE: &str = "METALCTL_CA_FILE";

/// The config file, strict: an unknown key is an error, not silently ignored.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub api_url: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
    /// PEM bundle an `https://` API's certificate must chain to (default: the system's store).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// What the commands use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub api_url: String,
    pub token: Option<String>,
    /// `None`: the system's trust store.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {} is not valid (expected YAML with `api_url`, `token` and `ca_file`)", .path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error(
        "no API URL: pass --api-url, set {ENV_API_URL}, or put `api_url:` into {}",
        .config_path.display()
    )]
    NoApiUrl { config_path: PathBuf },
}

/// The default config file: `$XDG_CONFIG_HOME/metalctl/config.yaml`, else
/// `$HOME/.config/metalctl/config.yaml`.
pub fn default_path(env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    let base = env("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| Path::new(&h).join(".config")))
        .unwrap_or_else(|| PathBuf::from(".config"));
    base.join("metalctl").join("config.yaml")
}

/// Reads a config file. A missing file is fine when it is the default one (`required` false);
/// one named with `--config` must exist.
pub fn load_file(path: &Path, required: bool) -> Result<ConfigFile, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(ConfigFile::default()),
        Err(source) => return Err(ConfigError::Read { path: path.to_path_buf(), source }),
    };
    if text.trim().is_empty() {
        return Ok(ConfigFile::default());
    }
    serde_yaml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_path_buf(), source })
}

/// The file's mode when a token file is readable or writable by group or others (it should be
/// 0600, like an SSH key); `None` when it is private or cannot be inspected.
pub fn loose_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}

/// Flags win over the environment, the environment over the file. Empty values count as unset.
pub fn resolve(
    flag_api_url: Option<&str>,
    flag_token: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
    file: &ConfigFile,
    config_path: &Path,
) -> Result<Settings, ConfigError> {
    fn pick(flag: Option<&str>, env: Option<String>, file: Option<&String>) -> Option<String> {
        let set = |v: &String| !v.trim().is_empty();
        flag.map(str::to_string)
            .filter(set)
            .or(env.filter(set))
            .or(file.filter(|v| set(v)).cloned())
            .map(|v| v.trim().to_string())
    }
    let api_url = pick(flag_api_url, env(ENV_API_URL), file.api_url.as_ref())
        .ok_or_else(|| ConfigError::NoApiUrl { config_path: config_path.to_path_buf() })?;
    let token = pick(flag_token, env(ENV_TOKEN), file.token.as_ref());
    let file_ca = file.ca_file.as_ref().map(|p| p.display().to_string());
    let ca_file = pick(None, env(ENV_CA_FILE), file_ca.as_ref()).map(PathBuf::from);
    Ok(Settings { api_url, token, ca_file })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    fn file(url: Option<&str>, token: Option<&str>) -> ConfigFile {
        ConfigFile { api_url: url.map(Into::into), token: token.map(Into::into), ca_file: None }
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let p = Path::new("/cfg.yaml");
        let f = file(Some("http://file:1"), Some("file-token"));
        let env = env_of(&[(ENV_API_URL, "http://env:1"), (ENV_TOKEN, "env-token")]);
        let none = env_of(&[]);

        // (flag url, flag token, use env, use file) -> (url, token)
        type Case<'a> = (Option<&'a str>, Option<&'a str>, bool, bool, &'a str, Option<&'a str>);
        let cases: &[Case] = &[
            (Some("http://flag:1"), Some("flag-token"), true, true, "http://flag:1", Some("flag-token")),
            (None, None, true, true, "http://env:1", Some("env-token")),
            (None, None, false, true, "http://file:1", Some("file-token")),
            (Some("http://flag:1"), None, false, true, "http://flag:1", Some("file-token")),
            (None, Some("flag-token"), true, false, "http://env:1", Some("flag-token")),
            (Some("http://flag:1"), None, false, false, "http://flag:1", None),
            // Empty values count as unset and fall through.
            (Some(""), Some(" "), true, true, "http://env:1", Some("env-token")),
        ];
        for (i, (fu, ft, use_env, use_file, want_url, want_token)) in cases.iter().enumerate() {
            let e: &dyn Fn(&str) -> Option<String> = if *use_env { &env } else { &none };
            let fl = if *use_file { f.clone() } else { ConfigFile::default() };
            let s = resolve(*fu, *ft, e, &fl, p).unwrap();
            assert_eq!(s.api_url, *want_url, "case {i}");
            assert_eq!(s.token.as_deref(), *want_token, "case {i}");
        }
    }

    #[test]
    fn ca_file_from_env_beats_the_file() {
        let p = Path::new("/cfg.yaml");
        let mut f = file(Some("https://file:1"), None);
        assert_eq!(resolve(None, None, &env_of(&[]), &f, p).unwrap().ca_file, None);
        f.ca_file = Some(PathBuf::from("/etc/metal/ca.pem"));
        let s = resolve(None, None, &env_of(&[]), &f, p).unwrap();
        assert_eq!(s.ca_file, Some(PathBuf::from("/etc/metal/ca.pem")));
        let s = resolve(None, None, &env_of(&[(ENV_CA_FILE, "/tmp/lab-ca.pem")]), &f, p).unwrap();
        assert_eq!(s.ca_file, Some(PathBuf::from("/tmp/lab-ca.pem")));
    }

    #[test]
    fn missing_url_names_all_three_places() {
        let err = resolve(None, Some("t"), &env_of(&[]), &ConfigFile::default(), Path::new("/x/c.yaml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("--api-url") && msg.contains(ENV_API_URL) && msg.contains("/x/c.yaml"), "{msg}");
    }

    #[test]
    fn default_path_prefers_xdg_then_home() {
        assert_eq!(
            default_path(&env_of(&[("HOME", "/home/a"), ("XDG_CONFIG_HOME", "/xdg")])),
            PathBuf::from("/xdg/metalctl/config.yaml")
        );
        assert_eq!(default_path(&env_of(&[("HOME", "/home/a")])), PathBuf::from("/home/a/.config/metalctl/config.yaml"));
    }

    #[test]
    fn token_files_readable_by_others_are_noticed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, "token: x\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(loose_mode(&path), Some(0o644));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(loose_mode(&path), None);
        assert_eq!(loose_mode(&dir.path().join("missing")), None);
    }

    #[test]
    fn config_files_load_strictly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");

        // Missing: fine for the default file, an error for an explicit one.
        assert_eq!(load_file(&path, false).unwrap(), ConfigFile::default());
        assert!(matches!(load_file(&path, true), Err(ConfigError::Read { .. })));

        std::fs::write(&path, "api_url: http://10.99.0.1:8080\ntoken: abc\n").unwrap();
        assert_eq!(load_file(&path, true).unwrap(), file(Some("http://10.99.0.1:8080"), Some("abc")));

        std::fs::write(&path, "api_url: http://x\ntokn: abc\n").unwrap();
        let err = load_file(&path, true).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }));
        assert!(format!("{:#}", anyhow::Error::from(err)).contains("tokn"));
    }
}
