//! Reproducible tar archives, zstd compression with a running SHA-256, and the manifest and
//! `sha256sum` files written next to every image.
//!
//! Reproducibility rules: entries in path order (the [`Tree`] order), one fixed mtime for every
//! entry (`SOURCE_DATE_EPOCH`, default 0), numeric owners only (no user or group names), fixed
//! zstd parameters (level, checksum flag, single-threaded).

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use metal_types::ImageManifest;
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use crate::error::{at, Error, Result};
use crate::tree::{Data, Kind, Tree};

/// The mtime every archive entry gets: `SOURCE_DATE_EPOCH` when set, else 0.
pub fn source_date_epoch() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// Writes `tree` as a tar stream (GNU format, long names by GNU extension) to `out`.
pub fn write_tar(tree: &Tree, out: &mut dyn Write, mtime: u64) -> io::Result<()> {
    let mut builder = tar::Builder::new(out);
    for (path, entry) in tree.iter() {
        let mut h = Header::new_gnu();
        h.set_mode(entry.mode);
        h.set_uid(entry.uid.into());
        h.set_gid(entry.gid.into());
        h.set_mtime(mtime);
        h.set_size(0);
        match &entry.kind {
            Kind::Dir => {
                h.set_entry_type(EntryType::Directory);
                builder.append_data(&mut h, format!("{path}/"), io::empty())?;
            }
            Kind::File { data, size } => {
                h.set_entry_type(EntryType::Regular);
                h.set_size(*size);
                match data {
                    Data::Bytes(bytes) => builder.append_data(&mut h, path, bytes.as_slice())?,
                    Data::Host(host) => {
                        let file = File::open(host).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", host.display())))?;
                        let mut reader = ExactReader { inner: file.take(*size), left: *size, path: host };
                        builder.append_data(&mut h, path, &mut reader)?;
                    }
                    Data::Filler { seed } => builder.append_data(&mut h, path, crate::filler::FillerReader::new(*seed, *size))?,
                }
            }
            Kind::Symlink(target) => {
                h.set_entry_type(EntryType::Symlink);
                builder.append_link(&mut h, path, target)?;
            }
            Kind::HardLink(target) => {
                h.set_entry_type(EntryType::Link);
                builder.append_link(&mut h, path, target)?;
            }
            Kind::CharDev { major, minor } | Kind::BlockDev { major, minor } => {
                let block = matches!(entry.kind, Kind::BlockDev { .. });
                h.set_entry_type(if block { EntryType::Block } else { EntryType::Char });
                h.set_device_major(*major)?;
                h.set_device_minor(*minor)?;
                builder.append_data(&mut h, path, io::empty())?;
            }
            Kind::Fifo => {
                h.set_entry_type(EntryType::Fifo);
                builder.append_data(&mut h, path, io::empty())?;
            }
        }
    }
    builder.finish()
}

/// Reads exactly `left` bytes; a file that shrank while archiving is an error, not a short entry.
struct ExactReader<'a, R> {
    inner: R,
    left: u64,
    path: &'a Path,
}

impl<R: Read> Read for ExactReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::other(format!("{} shrank while it was archived", self.path.display())));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Counts bytes written through it; prints progress for large streams.
struct Counter<W> {
    inner: W,
    count: u64,
    label: Option<String>,
    next_report: u64,
    started: Instant,
}

const REPORT_EVERY: u64 = 256 << 20;

impl<W: Write> Write for Counter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        if self.count >= self.next_report {
            if let Some(label) = &self.label {
                eprintln!("  {label}: {} MiB in {:.0?}", self.count >> 20, self.started.elapsed());
            }
            self.next_report += REPORT_EVERY;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Compresses what is written to it as independent zstd frames of `frame` bytes (the last one
/// shorter), each with content size and checksum.
pub struct Framed<W: Write> {
    inner: W,
    compressor: zstd::bulk::Compressor<'static>,
    buf: Vec<u8>,
    out: Vec<u8>,
    frame: usize,
    /// Frames written so far.
    frames: u64,
}

impl<W: Write> Framed<W> {
    pub fn new(inner: W, level: i32, frame: usize) -> io::Result<Self> {
        let mut compressor = zstd::bulk::Compressor::new(level)?;
        compressor.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
        compressor.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(true))?;
        Ok(Framed { inner, compressor, buf: Vec::with_capacity(frame), out: Vec::new(), frame: frame.max(1), frames: 0 })
    }

    fn emit(&mut self) -> io::Result<()> {
        self.out.clear();
        self.out.reserve(zstd::zstd_safe::compress_bound(self.buf.len()));
        self.compressor.compress_to_buffer(&self.buf, &mut self.out)?;
        self.inner.write_all(&self.out)?;
        self.buf.clear();
        self.frames += 1;
        Ok(())
    }

    /// Writes the last frame (an empty input still makes one empty frame) and returns the
    /// inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        if !self.buf.is_empty() || self.frames == 0 {
            self.emit()?;
        }
        Ok(self.inner)
    }
}

impl<W: Write> Write for Framed<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(self.frame - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.frame {
            self.emit()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Hashes and counts what goes to the compressed file.
struct Hasher<W> {
    inner: W,
    sha: Sha256,
    count: u64,
}

impl<W: Write> Write for Hasher<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Sizes and digest of a written compressed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub path: PathBuf,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    /// Lower-case hex SHA-256 of the compressed file.
    pub sha256: String,
}

/// Uncompressed bytes per frame of an OS image: metal-hammer decompresses whole frames on
/// several cores at once (its `install::decode`); 8 MiB frames cost about 1 % of compression.
pub use metal_types::IMAGE_FRAME;

/// Writes `path` as zstd at `level` (single frame, content checksum, single-threaded) from what
/// `fill` writes; atomically (a temporary file renamed into place). For what the kernel
/// decompresses (initramfs).
pub fn write_zst(path: &Path, level: i32, label: &str, fill: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> Result<Written> {
    write_zst_as(path, level, label, None, fill)
}

/// Writes an OS image: like [`write_zst`], but as independent frames of [`IMAGE_FRAME`]
/// uncompressed bytes, each with its content size and checksum. `zstd -d` reads it as usual.
pub fn write_image_zst(
    path: &Path,
    level: i32,
    label: &str,
    fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<Written> {
    write_zst_as(path, level, label, Some(IMAGE_FRAME), fill)
}

fn write_zst_as(
    path: &Path,
    level: i32,
    label: &str,
    frame: Option<usize>,
    fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<Written> {
    let tmp = tmp_path(path);
    let result = (|| -> io::Result<Written> {
        let file = File::create(&tmp)?;
        let hasher = Hasher { inner: BufWriter::with_capacity(1 << 20, file), sha: Sha256::new(), count: 0 };
        let enc = match frame {
            Some(frame) => Enc::Framed(Framed::new(hasher, level, frame)?),
            None => {
                let mut enc = zstd::Encoder::new(hasher, level)?;
                enc.include_checksum(true)?;
                Enc::Single(enc)
            }
        };
        let mut counter =
            Counter { inner: enc, count: 0, label: Some(label.to_string()), next_report: REPORT_EVERY, started: Instant::now() };
        fill(&mut counter)?;
        let uncompressed_size = counter.count;
        let mut hasher = counter.inner.finish()?;
        hasher.flush()?;
        let file = hasher.inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(Written {
            path: path.to_path_buf(),
            compressed_size: hasher.count,
            uncompressed_size,
            sha256: hex::encode(hasher.sha.finalize()),
        })
    })();
    match result {
        Ok(w) => {
            fs::rename(&tmp, path).map_err(at(path))?;
            Ok(w)
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(Error::io(path, e))
        }
    }
}

/// One zstd frame for the whole file, or frames of a fixed size.
enum Enc<W: Write> {
    Single(zstd::Encoder<'static, W>),
    Framed(Framed<W>),
}

impl<W: Write> Enc<W> {
    fn finish(self) -> io::Result<W> {
        match self {
            Enc::Single(e) => e.finish(),
            Enc::Framed(f) => f.finish(),
        }
    }
}

impl<W: Write> Write for Enc<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Enc::Single(e) => e.write(buf),
            Enc::Framed(f) => f.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Enc::Single(e) => e.flush(),
            Enc::Framed(f) => f.flush(),
        }
    }
}

/// Writes a small file atomically.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    fs::write(&tmp, bytes).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, e)
    })?;
    fs::rename(&tmp, path).map_err(at(path))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    path.with_file_name(name)
}

/// SHA-256 of a file, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(at(path))?;
    let mut sha = Sha256::new();
    io::copy(&mut file, &mut sha).map_err(at(path))?;
    Ok(hex::encode(sha.finalize()))
}

/// The `sha256sum` line for a file: `<hex>  <file name>`.
pub fn sha256sum_line(sha256: &str, file_name: &str) -> String {
    format!("{sha256}  {file_name}\n")
}

/// Writes `<image>.json` (the manifest) and `<image>.sha256` next to the image file.
/// Returns the manifest path.
pub fn write_manifest(image: &Path, manifest: &ImageManifest) -> Result<PathBuf> {
    let name = image
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Invalid(format!("bad image path {}", image.display())))?;
    let json_path = image.with_file_name(format!("{name}.json"));
    let mut json = serde_json::to_vec_pretty(manifest).map_err(|e| Error::Invalid(e.to_string()))?;
    json.push(b'\n');
    write_file(&json_path, &json)?;
    write_file(&image.with_file_name(format!("{name}.sha256")), sha256sum_line(&manifest.sha256, name).as_bytes())?;
    Ok(json_path)
}

/// Reads a manifest written by [`write_manifest`].
pub fn read_manifest(path: &Path) -> Result<ImageManifest> {
    let text = fs::read(path).map_err(at(path))?;
    serde_json::from_slice(&text).map_err(|e| Error::Parse { file: path.to_path_buf(), message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Tree {
        let mut t = Tree::new();
        t.bytes("etc/hostname", 0o644, b"x\n".to_vec()).unwrap();
        t.symlink("bin/sh", "busybox").unwrap();
        t.char_dev("dev/null", 0o666, 1, 3).unwrap();
        let long = format!("usr/share/{}/file", "d".repeat(120));
        t.bytes(&long, 0o600, b"long".to_vec()).unwrap();
        t
    }

    #[test]
    fn tar_lists_back_with_fixed_metadata() {
        let mut out = Vec::new();
        write_tar(&sample(), &mut out, 1_700_000_000).unwrap();
        let mut ar = tar::Archive::new(out.as_slice());
        let mut names = Vec::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            assert_eq!(h.mtime().unwrap(), 1_700_000_000);
            assert_eq!(h.uid().unwrap(), 0);
            assert_eq!(h.username().unwrap(), Some(""));
            names.push(e.path().unwrap().to_string_lossy().into_owned());
        }
        assert_eq!(names[0], "bin/");
        assert!(names.contains(&"dev/null".to_string()));
        assert!(names.iter().any(|n| n.ends_with("/file") && n.len() > 130));
    }

    #[test]
    fn zst_is_reproducible_and_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.tar.zst");
        let b = dir.path().join("b.tar.zst");
        let wa = write_zst(&a, 3, "a", |w| write_tar(&sample(), w, 0)).unwrap();
        let wb = write_zst(&b, 3, "b", |w| write_tar(&sample(), w, 0)).unwrap();
        assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
        assert_eq!(wa.sha256, sha256_file(&a).unwrap());
        assert_eq!(wa.compressed_size, fs::metadata(&a).unwrap().len());
        let plain = zstd::decode_all(File::open(&a).unwrap()).unwrap();
        assert_eq!(plain.len() as u64, wa.uncompressed_size);
        assert_eq!(wa.sha256, wb.sha256);
    }

    #[test]
    fn images_are_frames_of_a_fixed_size_that_zstd_reads_as_one_stream() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.zst");
        // Three frames and a bit, of content that compresses.
        let plain: Vec<u8> = (0..3 * IMAGE_FRAME + 12_345).map(|i| ((i / 7) % 251) as u8 ^ (i >> 16) as u8).collect();
        let w = write_image_zst(&path, 3, "big", |w| w.write_all(&plain)).unwrap();
        assert_eq!(w.uncompressed_size, plain.len() as u64);
        let bytes = fs::read(&path).unwrap();
        assert_eq!(w.sha256, sha256_file(&path).unwrap());
        assert_eq!(zstd::decode_all(&bytes[..]).unwrap(), plain);
        // Walk the frames: each says its content size, all but the last IMAGE_FRAME.
        let mut at = 0;
        let mut sizes = Vec::new();
        while at < bytes.len() {
            let n = zstd::zstd_safe::find_frame_compressed_size(&bytes[at..]).unwrap();
            sizes.push(zstd::zstd_safe::get_frame_content_size(&bytes[at..at + n]).unwrap().unwrap());
            at += n;
        }
        assert_eq!(sizes, [IMAGE_FRAME as u64, IMAGE_FRAME as u64, IMAGE_FRAME as u64, 12_345]);
        // Reproducible, like the single-frame files.
        let again = dir.path().join("again.zst");
        assert_eq!(write_image_zst(&again, 3, "again", |w| w.write_all(&plain)).unwrap().sha256, w.sha256);
        // Nothing in, one empty frame out (a valid, empty zstd file).
        let empty = dir.path().join("empty.zst");
        write_image_zst(&empty, 3, "empty", |_| Ok(())).unwrap();
        assert!(zstd::decode_all(&fs::read(&empty).unwrap()[..]).unwrap().is_empty());
    }

    #[test]
    fn sha256sum_format() {
        assert_eq!(sha256sum_line("ab", "x.tar.zst"), "ab  x.tar.zst\n");
    }
}
