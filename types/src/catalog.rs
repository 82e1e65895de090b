//! The catalog objects (partitions, sizes, filesystem layouts, projects, images) as one trait:
//! what each is called, where it lives under `/v1`, its id and its checks. The API stores and
//! serves them through it, the client (`metal-client`, metalctl) addresses them through it, the
//! OpenAPI document lists their routes through it — so a new kind is one `impl` here.

use crate::{FilesystemLayout, Image, Partition, Project, Size};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The size id of a machine that matches no size, or more than one.
pub const UNKNOWN_SIZE: &str = "unknown";

/// A catalog object: `POST`/`GET /v1/<PLURAL>`, `GET`/`DELETE /v1/<PLURAL>/{id}`.
pub trait CatalogObject: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    /// Singular, for messages: `partition`, `size`, `layout`, `project`, `image`.
    const NOUN: &'static str;
    /// The path segment under `/v1` (and the table): `partitions`, …
    const PLURAL: &'static str;
    fn id(&self) -> &str;
    /// The checks the API makes before it stores one; the message says what to change.
    fn validate(&self) -> Result<(), String>;
}

fn validate_url(what: &str, url: &str) -> Result<(), String> {
    if !(url.starts_with("http://") || url.starts_with("https://")) || url.chars().any(|c| c.is_whitespace() || c == '"') {
        return Err(format!("{what} {url:?} must be an http:// or https:// URL without spaces or quotes"));
    }
    Ok(())
}

/// Checks a size before it is stored.
pub fn validate_size(size: &Size) -> Result<(), String> {
    validate_id("size", &size.id)?;
    if size.id == UNKNOWN_SIZE {
        return Err("size id `unknown` is reserved for machines that match no size; pick another id".into());
    }
    if size.constraints.is_empty() {
        return Err("a size needs at least one constraint (cores, memory or storage)".into());
    }
    for c in &size.constraints {
        if c.min > c.max {
            return Err(format!("constraint {:?} has min {} > max {}; swap them", c.kind, c.min, c.max));
        }
    }
    let mut kinds: Vec<_> = size.constraints.iter().map(|c| c.kind as u8).collect();
    kinds.sort_unstable();
    if kinds.windows(2).any(|w| w[0] == w[1]) {
        return Err("a size has at most one constraint per kind".into());
    }
    Ok(())
}

/// Ids of catalog objects: 1–63 characters of `a-z 0-9 - _ .`, starting with a letter or digit.
pub fn validate_id(what: &str, id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!("{what} id {id:?} is invalid: use 1-63 characters a-z, 0-9, '-', '_', '.', starting with a letter or digit"))
    }
}

impl CatalogObject for Partition {
    const NOUN: &'static str = "partition";
    const PLURAL: &'static str = "partitions";
    fn id(&self) -> &str {
        &self.id
    }
    fn validate(&self) -> Result<(), String> {
        validate_id("partition", &self.id)?;
        validate_url("boot.kernel_url", &self.boot.kernel_url)?;
        validate_url("boot.initrd_url", &self.boot.initrd_url)?;
        validate_url("boot.api_url", &self.boot.api_url)?;
        if self.boot.cmdline.contains('"') || self.boot.cmdline.contains("metal.") {
            return Err("boot.cmdline must not contain quotes or metal.* parameters (the API adds those)".into());
        }
        Ok(())
    }
}

impl CatalogObject for Size {
    const NOUN: &'static str = "size";
    const PLURAL: &'static str = "sizes";
    fn id(&self) -> &str {
        &self.id
    }
    fn validate(&self) -> Result<(), String> {
        validate_size(self)
    }
}

impl CatalogObject for FilesystemLayout {
    const NOUN: &'static str = "layout";
    const PLURAL: &'static str = "layouts";
    fn id(&self) -> &str {
        &self.id
    }
    fn validate(&self) -> Result<(), String> {
        validate_id("layout", &self.id)?;
        if self.disks.is_empty() {
            return Err("a layout needs at least one disk".into());
        }
        for d in &self.disks {
            if d.partitions.is_empty() {
                return Err(format!("disk {} has no partitions", d.device));
            }
            for (i, p) in d.partitions.iter().enumerate() {
                if p.number as usize != i + 1 {
                    return Err(format!("partitions of disk {} must be numbered 1, 2, … in order", d.device));
                }
                if p.size_mib == 0 && i + 1 != d.partitions.len() {
                    return Err(format!(
                        "partition {} of disk {}: size 0 (rest of the disk) is only allowed for the last partition",
                        p.number, d.device
                    ));
                }
            }
        }
        for fs in &self.filesystems {
            let Some((dev, num)) = fs.source.rsplit_once(':') else {
                return Err(format!("filesystem source {:?} must be <disk>:<partition number>", fs.source));
            };
            let num: u32 = num.parse().map_err(|_| format!("filesystem source {:?}: bad partition number", fs.source))?;
            let known = self.disks.iter().any(|d| d.device == dev && d.partitions.iter().any(|p| p.number == num));
            if !known {
                return Err(format!("filesystem source {:?} names no partition of this layout", fs.source));
            }
        }
        Ok(())
    }
}

impl CatalogObject for Project {
    const NOUN: &'static str = "project";
    const PLURAL: &'static str = "projects";
    fn id(&self) -> &str {
        &self.id
    }
    fn validate(&self) -> Result<(), String> {
        validate_id("project", &self.id)
    }
}

/// Images are immutable and also found by name (the newest unexpired version); their id is
/// `<name>-<version>` from the manifest, set by the API when it is left out.
impl CatalogObject for Image {
    const NOUN: &'static str = "image";
    const PLURAL: &'static str = "images";
    fn id(&self) -> &str {
        &self.id
    }
    fn validate(&self) -> Result<(), String> {
        let m = &self.manifest;
        let id = m.id();
        if !self.id.is_empty() && self.id != id {
            return Err(format!(
                "image id {:?} does not match <name>-<version> = {id:?}; leave id out, the API sets it",
                self.id
            ));
        }
        validate_id("image", &id)?;
        if m.name.is_empty() || m.version.is_empty() {
            return Err("manifest name and version must not be empty".into());
        }
        if m.sha256.len() != 64 || !m.sha256.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)) {
            return Err("sha256 must be 64 lower-case hex digits (the SHA-256 of the compressed file)".into());
        }
        validate_url("url", &self.url)?;
        if m.kernel.is_empty() {
            return Err("kernel (path of the kernel inside the image) must not be empty".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["lab", "fra-1", "a.b_c", "0x", &"a".repeat(63)] {
            assert!(validate_id("x", ok).is_ok(), "{ok:?}");
        }
        for bad in ["", "-a", "A", "a b", "a/b", &"a".repeat(64), "ä"] {
            assert!(validate_id("x", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn kinds_have_distinct_paths() {
        let plurals = [Partition::PLURAL, Size::PLURAL, FilesystemLayout::PLURAL, Project::PLURAL, Image::PLURAL];
        let nouns = [Partition::NOUN, Size::NOUN, FilesystemLayout::NOUN, Project::NOUN, Image::NOUN];
        for (p, n) in plurals.iter().zip(nouns) {
            assert_eq!(*p, format!("{n}s"), "the path segment is the noun's plural");
        }
    }
}
