//! Filler files for size benchmarks: a deterministic set of big, medium and small files whose
//! content is generated while the archive is written (nothing is held in memory or on disk).
//!
//! The content compresses, but not to nothing: every 64 KiB block is one shared pseudo-random
//! base block in which each 4 KiB page has 256 bytes replaced by fresh pseudo-random text
//! (64 symbols). zstd finds the base block in its window (long matches) and has to code the
//! fresh text as literals, so decompressing it is real work, and the archive comes out at
//! roughly a sixteenth to a twentieth of the filler's size. Everything follows from the seed:
//! the same seed gives byte-identical files.

use std::io::{self, Read};

use crate::error::Result;
use crate::tree::{Data, Entry, Kind, Tree};

/// Where the filler goes in the image.
pub const DIR: &str = "opt/filler";
/// Size of the generated blocks.
pub const BLOCK: usize = 64 << 10;
const PAGE: usize = 4096;
const FRESH: usize = 256;
/// Biggest single file (the big files take three quarters of the total).
const BIG_FILE: u64 = 256 << 20;
const MEDIUM_FILE: u64 = 4 << 20;
/// Small files per directory.
const PER_DIR: usize = 256;
const SYMBOLS: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";

/// SplitMix64: tiny, fast and good enough to make bytes nobody will look at.
#[derive(Debug, Clone)]
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// One filler file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FillerFile {
    /// Path in the image (under [`DIR`]).
    pub path: String,
    pub size: u64,
    pub seed: u64,
}

/// The files that make up `total` bytes of filler: 3/4 in files of up to 256 MiB, 1/8 in 4 MiB
/// files, the rest in small files of 1–15 KiB, 256 to a directory. The sizes add up to
/// `total` exactly.
pub fn plan(total: u64, seed: u64) -> Vec<FillerFile> {
    let mut files = Vec::new();
    let mut rng = SplitMix(seed);
    let mut file = |path: String, size: u64, rng: &mut SplitMix| files.push(FillerFile { path, size, seed: rng.next() });
    let big_total = total / 4 * 3;
    let medium_total = total / 8;
    let small_total = total - big_total - medium_total;
    for (i, start) in (0..big_total).step_by(BIG_FILE as usize).enumerate() {
        file(format!("{DIR}/big/{i:03}.bin"), BIG_FILE.min(big_total - start), &mut rng);
    }
    for (i, start) in (0..medium_total).step_by(MEDIUM_FILE as usize).enumerate() {
        file(format!("{DIR}/medium/{i:04}.bin"), MEDIUM_FILE.min(medium_total - start), &mut rng);
    }
    let mut left = small_total;
    let mut i = 0usize;
    while left > 0 {
        let want = 1024 + rng.next() % (14 << 10);
        let size = want.min(left);
        file(format!("{DIR}/small/{:04}/{:03}.dat", i / PER_DIR, i % PER_DIR), size, &mut rng);
        left -= size;
        i += 1;
    }
    files
}

/// Adds the files of [`plan`] to `tree` (mode 0644, root); returns how many.
pub fn add(tree: &mut Tree, total: u64, seed: u64) -> Result<usize> {
    let files = plan(total, seed);
    for f in &files {
        tree.insert(
            &f.path,
            Entry { mode: 0o644, uid: 0, gid: 0, kind: Kind::File { data: Data::Filler { seed: f.seed }, size: f.size } },
        )?;
    }
    Ok(files.len())
}

/// The content of one filler file, `size` bytes from `seed`, generated block by block.
pub struct FillerReader {
    seed: u64,
    size: u64,
    pos: u64,
    base: Vec<u8>,
    block: Vec<u8>,
    /// Which block `block` holds.
    current: Option<u64>,
}

impl FillerReader {
    pub fn new(seed: u64, size: u64) -> FillerReader {
        // One base block for every file, so small files match each other too.
        let mut rng = SplitMix(0x6d65_7461_6c2d_6669);
        let mut base = vec![0u8; BLOCK];
        for chunk in base.chunks_mut(8) {
            chunk.copy_from_slice(&rng.next().to_le_bytes()[..chunk.len()]);
        }
        FillerReader { seed, size, pos: 0, block: base.clone(), base, current: None }
    }

    fn fill_block(&mut self, index: u64) {
        self.block.copy_from_slice(&self.base);
        let mut rng = SplitMix(self.seed ^ index.wrapping_mul(0xa076_1d64_78bd_642f));
        for page in self.block.chunks_mut(PAGE) {
            let at = (rng.next() % (PAGE - FRESH) as u64) as usize;
            for chunk in page[at..at + FRESH].chunks_mut(8) {
                let r = rng.next().to_le_bytes();
                for (b, x) in chunk.iter_mut().zip(r) {
                    *b = SYMBOLS[(x & 63) as usize];
                }
            }
        }
        self.current = Some(index);
    }
}

impl Read for FillerReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let index = self.pos / BLOCK as u64;
        if self.current != Some(index) {
            self.fill_block(index);
        }
        let off = (self.pos % BLOCK as u64) as usize;
        let n = buf.len().min(BLOCK - off).min((self.size - self.pos) as usize);
        buf[..n].copy_from_slice(&self.block[off..off + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(seed: u64, size: u64) -> Vec<u8> {
        let mut v = Vec::new();
        FillerReader::new(seed, size).read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn plan_adds_up_and_mixes_sizes() {
        let total = 64 << 20;
        let files = plan(total, 7);
        assert_eq!(files.iter().map(|f| f.size).sum::<u64>(), total);
        let big = files.iter().filter(|f| f.path.contains("/big/")).count();
        let medium = files.iter().filter(|f| f.path.contains("/medium/")).count();
        let small: Vec<_> = files.iter().filter(|f| f.path.contains("/small/")).collect();
        assert_eq!(big, 1);
        assert_eq!(medium, 2);
        assert!(small.len() > 900, "{} small files", small.len());
        assert!(small.iter().all(|f| f.size <= 15 << 10 && f.size > 0));
        // 2 GiB: six 256 MiB files.
        let files = plan(2 << 30, 7);
        assert_eq!(files.iter().filter(|f| f.path.contains("/big/") && f.size == BIG_FILE).count(), 6);
        assert_eq!(files.iter().map(|f| f.size).sum::<u64>(), 2 << 30);
    }

    #[test]
    fn plan_and_content_are_deterministic() {
        assert_eq!(plan(8 << 20, 1), plan(8 << 20, 1));
        assert_ne!(plan(8 << 20, 1), plan(8 << 20, 2));
        assert_eq!(content(5, 300_000), content(5, 300_000));
        assert_ne!(content(5, 300_000), content(6, 300_000));
    }

    #[test]
    fn reads_in_odd_pieces_give_the_same_bytes() {
        let whole = content(9, 200_001);
        assert_eq!(whole.len(), 200_001);
        let mut r = FillerReader::new(9, 200_001);
        let mut pieces = Vec::new();
        let mut buf = [0u8; 1000];
        loop {
            let n = r.read(&mut buf[..777]).unwrap();
            if n == 0 {
                break;
            }
            pieces.extend_from_slice(&buf[..n]);
        }
        assert_eq!(pieces, whole);
    }

    #[test]
    fn compresses_but_not_to_nothing() {
        let data = content(3, 8 << 20);
        assert!(data.iter().filter(|b| **b == 0).count() < data.len() / 100);
        let packed = zstd::encode_all(data.as_slice(), 3).unwrap();
        let ratio = data.len() as f64 / packed.len() as f64;
        assert!((8.0..40.0).contains(&ratio), "ratio {ratio:.1}");
    }

    #[test]
    fn tar_carries_the_generated_content() {
        let total = 2 << 20;
        let mut t = Tree::new();
        add(&mut t, total, 11).unwrap();
        let mut tar_bytes = Vec::new();
        crate::archive::write_tar(&t, &mut tar_bytes, 0).unwrap();
        let want: std::collections::BTreeMap<String, FillerFile> =
            plan(total, 11).into_iter().map(|f| (f.path.clone(), f)).collect();
        let mut seen = 0;
        for entry in tar::Archive::new(tar_bytes.as_slice()).entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let Some(f) = want.get(&path) else { continue };
            let mut got = Vec::new();
            entry.read_to_end(&mut got).unwrap();
            assert_eq!(got, content(f.seed, f.size), "{path}");
            seen += 1;
        }
        assert_eq!(seen, want.len());
    }

    #[test]
    fn added_files_are_generated_entries() {
        let mut t = Tree::new();
        let n = add(&mut t, 1 << 20, 4).unwrap();
        assert_eq!(n, plan(1 << 20, 4).len());
        assert_eq!(t.file_bytes(), 1 << 20);
        assert!(matches!(t.get(&plan(1 << 20, 4)[0].path).unwrap().kind, Kind::File { data: Data::Filler { .. }, .. }));
    }
}
