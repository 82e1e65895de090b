//! Reading catalog objects from files: YAML or JSON (told apart by content, not by file name),
//! one object or a list of them.

use std::path::Path;

use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid {noun} (JSON)")]
    Json {
        path: String,
        noun: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} is not a valid {noun} (YAML)")]
    Yaml {
        path: String,
        noun: &'static str,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{path} holds no {noun}")]
    Empty { path: String, noun: &'static str },
}

/// True when the text is JSON: its first non-blank character opens an object or an array.
/// Everything else is read as YAML (which also covers `# comments` at the top).
pub fn looks_like_json(text: &str) -> bool {
    matches!(text.trim_start().chars().next(), Some('{' | '['))
}

/// What a file held: its objects, and whether they came as a list (so output keeps the shape).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Objects<T> {
    pub items: Vec<T>,
    pub list: bool,
}

/// Parses one object or a list of objects of type `T`. `path` and `noun` name the source in
/// errors; the parser's own message carries line and column.
pub fn parse_objects<T: DeserializeOwned>(text: &str, path: &str, noun: &'static str) -> Result<Objects<T>, InputError> {
    let list;
    let items = if looks_like_json(text) {
        let json = |source| InputError::Json { path: path.to_string(), noun, source };
        list = text.trim_start().starts_with('[');
        if list {
            serde_json::from_str::<Vec<T>>(text).map_err(json)?
        } else {
            vec![serde_json::from_str::<T>(text).map_err(json)?]
        }
    } else {
        let yaml = |source| InputError::Yaml { path: path.to_string(), noun, source };
        // Look at the shape first, then parse the text again as that shape, so errors keep
        // their line numbers.
        let shape = serde_yaml::from_str::<serde_yaml::Value>(text).map_err(yaml)?;
        list = shape.is_sequence();
        match shape {
            serde_yaml::Value::Null => Vec::new(),
            serde_yaml::Value::Sequence(_) => serde_yaml::from_str::<Vec<T>>(text).map_err(yaml)?,
            _ => vec![serde_yaml::from_str::<T>(text).map_err(yaml)?],
        }
    };
    if items.is_empty() {
        return Err(InputError::Empty { path: path.to_string(), noun });
    }
    Ok(Objects { items, list })
}

/// Reads `path` (`-` for standard input) and parses it with [`parse_objects`].
pub fn read_objects<T: DeserializeOwned>(path: &Path, noun: &'static str) -> Result<Objects<T>, InputError> {
    let name = path.display().to_string();
    let text = if name == "-" { std::io::read_to_string(std::io::stdin()) } else { std::fs::read_to_string(path) }
        .map_err(|source| InputError::Read { path: name.clone(), source })?;
    parse_objects(&text, &name, noun)
}

/// Reads a single JSON/YAML value of type `T` (e.g. an image manifest).
pub fn read_one<T: DeserializeOwned>(path: &Path, noun: &'static str) -> Result<T, InputError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| InputError::Read { path: name.clone(), source })?;
    if looks_like_json(&text) {
        serde_json::from_str(&text).map_err(|source| InputError::Json { path: name, noun, source })
    } else {
        serde_yaml::from_str(&text).map_err(|source| InputError::Yaml { path: name, noun, source })
    }
}

/// Reads SSH public keys from a file: one per line, blank lines and `#` comments skipped.
pub fn ssh_keys_from_text(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use metal_types::{ConstraintKind, FilesystemLayout, Image, ImageFormat, Partition, Project, Size};

    const PARTITION_YAML: &str = "\
# the lab
id: lab
description: QEMU lab
boot:
  kernel_url: http://10.99.0.1:8081/hammer/vmlinuz
  initrd_url: http://10.99.0.1:8081/hammer/initrd.img
  cmdline: console=ttyS0
  api_url: http://10.99.0.1:8080
";

    #[test]
    fn one_yaml_object() {
        let o = parse_objects::<Partition>(PARTITION_YAML, "p.yaml", "partition").unwrap();
        assert!(!o.list);
        let p = o.items;
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].id, "lab");
        assert_eq!(p[0].boot.cmdline, "console=ttyS0");
    }

    #[test]
    fn a_yaml_list() {
        let text = "- id: a\n- id: b\n  description: second\n";
        let o = parse_objects::<Project>(text, "p.yaml", "project").unwrap();
        assert!(o.list);
        let p = o.items;
        assert_eq!(p.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(p[1].description, "second");
    }

    #[test]
    fn one_json_object_and_a_json_list() {
        let one = r#"  {"id": "small", "constraints": [{"kind": "cores", "min": 1, "max": 4}]}"#;
        let o = parse_objects::<Size>(one, "s.json", "size").unwrap();
        assert!(!o.list);
        assert_eq!(o.items[0].constraints[0].kind, ConstraintKind::Cores);

        let list = r#"[{"id": "a"}, {"id": "b"}]"#;
        let o = parse_objects::<Project>(list, "p.json", "project").unwrap();
        assert!(o.list);
        assert_eq!(o.items.len(), 2);
    }

    #[test]
    fn json_in_a_yaml_named_file_is_still_json() {
        // Content decides, not the name.
        let p = parse_objects::<Project>(r#"{"id": "x"}"#, "p.yaml", "project").unwrap().items;
        assert_eq!(p[0].id, "x");
    }

    #[test]
    fn unknown_fields_are_errors_with_a_position() {
        let err = parse_objects::<Project>("id: a\ndescripton: typo\n", "p.yaml", "project").unwrap_err();
        let msg = format!("{:#}", anyhow::Error::from(err));
        assert!(msg.contains("p.yaml is not a valid project (YAML)"), "{msg}");
        assert!(msg.contains("descripton") && msg.contains("line 2"), "{msg}");

        let err = parse_objects::<Project>("[{\"id\": \"a\"},\n {\"idd\": 1}]", "p.json", "project").unwrap_err();
        let msg = format!("{:#}", anyhow::Error::from(err));
        assert!(msg.contains("idd") && msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn empty_files_are_errors() {
        assert!(matches!(parse_objects::<Project>("", "e.yaml", "project"), Err(InputError::Empty { .. })));
        assert!(matches!(parse_objects::<Project>("# nothing\n", "e.yaml", "project"), Err(InputError::Empty { .. })));
        assert!(matches!(parse_objects::<Project>("[]", "e.json", "project"), Err(InputError::Empty { .. })));
    }

    #[test]
    fn images_with_their_flattened_manifest() {
        let text = "\
url: http://10.99.0.1:8081/images/test-os-20261124.tar.zst
name: test-os
version: '20261124'
format: tar.zst
compressed_size: 100
uncompressed_size: 300
sha256: 00ff
kernel: boot/vmlinuz
";
        let i = parse_objects::<Image>(text, "i.yaml", "image").unwrap().items;
        assert_eq!(i[0].manifest.format, ImageFormat::TarZst);
        assert_eq!(i[0].manifest.id(), "test-os-20261124");
        assert_eq!(i[0].id, "");
    }

    #[test]
    fn images_refuse_unknown_fields_despite_the_flattened_manifest() {
        let text = "url: u\nname: n\nversion: '1'\nformat: tar.zst\ncompressed_size: 1\n\
                    uncompressed_size: 1\nsha256: x\nkernel: k\ninitrdd: typo\n";
        let err = parse_objects::<Image>(text, "i.yaml", "image").unwrap_err();
        assert!(format!("{:#}", anyhow::Error::from(err)).contains("initrdd"));
    }

    #[test]
    fn layouts_parse() {
        let text = "\
id: efi-ext4
disks:
  - device: first
    partitions:
      - {number: 1, label: efi, size_mib: 512, type: efi}
      - {number: 2, label: root, size_mib: 0, type: linux}
filesystems:
  - {source: 'first:1', kind: vfat, mount: /boot/efi}
  - {source: 'first:2', kind: ext4, mount: /}
";
        let l = parse_objects::<FilesystemLayout>(text, "l.yaml", "layout").unwrap().items;
        assert_eq!(l[0].disks[0].partitions.len(), 2);
        assert_eq!(l[0].filesystems[1].mount.as_deref(), Some("/"));
    }

    #[test]
    fn ssh_key_files_skip_blanks_and_comments() {
        let keys = ssh_keys_from_text("# mine\nssh-ed25519 AAAA a@b\n\n  ssh-rsa BBBB c@d  \n");
        assert_eq!(keys, ["ssh-ed25519 AAAA a@b", "ssh-rsa BBBB c@d"]);
    }

    /// Every metalctl example in `docs/examples/` parses as the kind its name says (the
    /// directory also holds other tools' examples; those are theirs to test).
    #[test]
    fn the_repository_examples_parse() {
        use metal_types::Partition;
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/examples");
        fn count<T>(r: Result<Objects<T>, InputError>) -> usize {
            r.unwrap().items.len()
        }
        let p = |name: &str| dir.join(name);
        assert_eq!(count(read_objects::<Partition>(&p("partition.yaml"), "partition")), 1);
        assert_eq!(count(read_objects::<Size>(&p("size.yaml"), "size")), 1);
        assert_eq!(count(read_objects::<FilesystemLayout>(&p("layout.yaml"), "layout")), 1);
        assert_eq!(count(read_objects::<Project>(&p("project.yaml"), "project")), 1);
        assert_eq!(count(read_objects::<Image>(&p("image.yaml"), "image")), 1);
        let cfg = crate::config::load_file(&p("metalctl-config.yaml"), true).unwrap();
        assert!(cfg.api_url.is_some() && cfg.token.is_some());
    }
}
