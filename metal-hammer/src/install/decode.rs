//! zstd decompression of the image stream, on threads of its own, frame-parallel where the
//! image allows it.
//!
//! A zstd frame can only be decompressed from its start, by one thread. image-builder writes
//! images as a series of independent frames of [`IMAGE_FRAME`] bytes each, every one with its
//! content size in the header (`docs/images.md`); such frames are collected whole (their end
//! is found by walking the block headers, without decompressing) and handed to a pool of
//! worker threads ([`default_workers`]), while the reader takes their output in
//! frame order. A frame without a content size, or a bigger one (any single-frame image), is
//! decompressed as a stream by the dispatching thread itself, with bounded memory, as before.
//! Skippable frames are skipped. Whatever the layout, the reader sees exactly the bytes
//! `zstd -d` would write, or an error.
//!
//! Memory: the decompressed data ready for the reader is bounded by the `ahead_mib` given to
//! [`Decoded::start_with_ahead`]: that many MiB of a streamed frame, or that many MiB worth of
//! collected frames (at least one), each at most [`MAX_PARALLEL_FRAME`] decompressed bytes
//! plus its compressed bytes; plus the frames the workers are on.

use std::io::{self, BufRead, Read};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use metal_types::IMAGE_FRAME;
use zstd::stream::raw::{Decoder as RawDecoder, Operation};

/// Size of the blocks of decompressed bytes handed to the reader.
pub const BLOCK: usize = 1 << 20;
/// Frames declaring more content than this are decompressed as a stream, not collected.
pub const MAX_PARALLEL_FRAME: u64 = 32 << 20;
/// Decompression threads at most (on top of the dispatching one).
pub const MAX_WORKERS: usize = 4;
/// MiB of decompressed data [`Decoded::start`] keeps ready for the reader.
pub const DEFAULT_AHEAD_MIB: usize = 8;

const ZSTD_MAGIC: u32 = 0xFD2F_B528;
/// The largest block the format allows (`Block_Maximum_Size`).
const MAX_BLOCK: usize = 128 << 10;

/// What a frame header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameHeader {
    /// A skippable frame of `total` bytes, header included.
    Skippable { total: u64 },
    /// A zstd frame: its header length, declared content size and whether a 4-byte content
    /// checksum follows the last block.
    Zstd { header_len: usize, content_size: Option<u64>, checksum: bool },
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Parses the frame header at the start of `buf`: the header, or (`Err`) how many bytes in
/// all it takes to tell, when `buf` has fewer. Never needs a byte past the header.
pub fn parse_header(buf: &[u8]) -> io::Result<Result<FrameHeader, usize>> {
    if buf.len() < 4 {
        return Ok(Err(4));
    }
    let magic = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes"));
    if magic & 0xFFFF_FFF0 == 0x184D_2A50 {
        if buf.len() < 8 {
            return Ok(Err(8));
        }
        let size = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
        return Ok(Ok(FrameHeader::Skippable { total: 8 + u64::from(size) }));
    }
    if magic != ZSTD_MAGIC {
        return Err(invalid(format!("not a zstd frame (magic {magic:#010x})")));
    }
    let Some(&fhd) = buf.get(4) else { return Ok(Err(5)) };
    if fhd & 0x08 != 0 {
        return Err(invalid("zstd frame header has its reserved bit set"));
    }
    let single_segment = fhd & 0x20 != 0;
    let dict_len = [0, 1, 2, 4][usize::from(fhd & 0x03)];
    let fcs_len = match fhd >> 6 {
        0 if single_segment => 1,
        0 => 0,
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let header_len = 5 + usize::from(!single_segment) + dict_len + fcs_len;
    if buf.len() < header_len {
        return Ok(Err(header_len));
    }
    let fcs = &buf[header_len - fcs_len..header_len];
    let content_size = match fcs_len {
        0 => None,
        1 => Some(u64::from(fcs[0])),
        2 => Some(u64::from(u16::from_le_bytes([fcs[0], fcs[1]])) + 256),
        4 => Some(u64::from(u32::from_le_bytes(fcs.try_into().expect("4 bytes")))),
        _ => Some(u64::from_le_bytes(fcs.try_into().expect("8 bytes"))),
    };
    Ok(Ok(FrameHeader::Zstd { header_len, content_size, checksum: fhd & 0x04 != 0 }))
}

/// Length of the block whose 3-byte header is `h`, header included; and whether it is the last.
fn block_len(h: [u8; 3]) -> io::Result<(usize, bool)> {
    let v = u32::from_le_bytes([h[0], h[1], h[2], 0]);
    let last = v & 1 != 0;
    let size = (v >> 3) as usize;
    let body = match (v >> 1) & 3 {
        0 | 2 if size > MAX_BLOCK => return Err(invalid(format!("zstd block of {size} bytes (at most {MAX_BLOCK})"))),
        0 | 2 => size,
        1 => 1,
        _ => return Err(invalid("zstd block of the reserved type")),
    };
    Ok((3 + body, last))
}

/// Appends exactly `n` bytes from `r` to `out`.
fn take<R: BufRead>(r: &mut R, n: usize, out: &mut Vec<u8>) -> io::Result<()> {
    if r.take(n as u64).read_to_end(out)? < n {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the image ends inside a zstd frame"));
    }
    Ok(())
}

/// Reads the next frame header into `head`, exactly its bytes; `Ok(None)` at the end of the
/// stream, between frames.
fn read_header<R: BufRead>(r: &mut R, head: &mut Vec<u8>) -> io::Result<Option<FrameHeader>> {
    head.clear();
    if r.fill_buf()?.is_empty() {
        return Ok(None);
    }
    loop {
        match parse_header(head)? {
            Ok(h) => return Ok(Some(h)),
            Err(need) => take(r, need - head.len(), head)?,
        }
    }
}

/// Spent blocks, reused instead of allocated (and faulted in) again.
#[derive(Default, Clone)]
struct Pool(Arc<Mutex<Vec<Vec<u8>>>>);

impl Pool {
    fn get(&self) -> Vec<u8> {
        let mut b = self.0.lock().unwrap().pop().unwrap_or_else(|| vec![0u8; BLOCK]);
        b.resize(BLOCK, 0);
        b
    }

    fn put(&self, b: Vec<u8>) {
        let mut pool = self.0.lock().unwrap();
        if b.capacity() >= BLOCK && pool.len() < 64 {
            pool.push(b);
        }
    }
}

type Blocks = Receiver<io::Result<Vec<u8>>>;

/// Decompresses one frame's worth of input into `tx`, in blocks. `input` yields the frame's
/// bytes (and maybe more); returns when the frame is complete, having consumed exactly it.
fn decode_frame<R: BufRead>(
    dec: &mut RawDecoder<'_>,
    input: &mut R,
    tx: &SyncSender<io::Result<Vec<u8>>>,
    pool: &Pool,
) -> io::Result<bool> {
    let mut out = pool.get();
    let mut filled = 0;
    loop {
        let avail = input.fill_buf()?;
        let input_ended = avail.is_empty();
        let st = dec.run_on_buffers(avail, &mut out[filled..])?;
        input.consume(st.bytes_read);
        filled += st.bytes_written;
        let done = st.remaining == 0;
        if filled == out.len() || (done && filled > 0) {
            out.truncate(filled);
            if tx.send(Ok(std::mem::replace(&mut out, pool.get()))).is_err() {
                return Ok(false);
            }
            filled = 0;
        }
        if done {
            pool.put(out);
            return Ok(true);
        }
        if input_ended && st.bytes_written == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the image ends inside a zstd frame"));
        }
    }
}

struct Job {
    frame: Vec<u8>,
    tx: SyncSender<io::Result<Vec<u8>>>,
}

fn worker(jobs: &Mutex<Receiver<Job>>, pool: &Pool) {
    let mut dec = match RawDecoder::new() {
        Ok(d) => d,
        Err(e) => {
            // Fail every job handed to this worker.
            while let Ok(job) = jobs.lock().unwrap().recv() {
                let _ = job.tx.send(Err(io::Error::new(e.kind(), e.to_string())));
            }
            return;
        }
    };
    loop {
        let job = match jobs.lock().unwrap().recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        let mut input = &job.frame[..];
        match decode_frame(&mut dec, &mut input, &job.tx, pool) {
            Ok(true) if !input.is_empty() => {
                let _ = job.tx.send(Err(invalid("zstd frame ends before its last block")));
            }
            Ok(_) => {}
            Err(e) => {
                let _ = job.tx.send(Err(e));
                let _ = dec.reinit();
            }
        }
    }
}

/// Splits the stream into frames and hands them out; ends at the end of the stream, at the
/// first error (passed on in order) or when the reader is gone.
fn dispatch<R: BufRead>(r: &mut R, order: &SyncSender<Blocks>, inline_blocks: usize, workers: usize, pool: &Pool) {
    let (jobs_tx, jobs_rx) = sync_channel::<Job>(workers);
    let jobs_rx = Mutex::new(jobs_rx);
    std::thread::scope(|scope| {
        // Dropped when this closure returns, which ends the workers before the scope joins them.
        let jobs_tx = jobs_tx;
        for i in 0..workers {
            let (jobs_rx, pool) = (&jobs_rx, pool);
            let _ =
                std::thread::Builder::new().name(format!("image-zstd-{i}")).spawn_scoped(scope, move || worker(jobs_rx, pool));
        }
        let fail = |e: io::Error| {
            let (tx, rx) = sync_channel(1);
            let _ = tx.send(Err(e));
            let _ = order.send(rx);
        };
        let mut inline = match RawDecoder::new() {
            Ok(d) => d,
            Err(e) => return fail(e),
        };
        let mut head = Vec::with_capacity(18);
        loop {
            let header = match read_header(r, &mut head) {
                Ok(Some(h)) => h,
                Ok(None) => return,
                Err(e) => return fail(e),
            };
            match header {
                FrameHeader::Skippable { total } => {
                    let left = total - head.len() as u64;
                    match io::copy(&mut (&mut *r).take(left), &mut io::sink()) {
                        Ok(n) if n == left => {}
                        Ok(_) => {
                            return fail(io::Error::new(io::ErrorKind::UnexpectedEof, "the image ends inside a skippable frame"))
                        }
                        Err(e) => return fail(e),
                    }
                }
                FrameHeader::Zstd { header_len, content_size: Some(size), checksum }
                    if size <= MAX_PARALLEL_FRAME && workers > 0 =>
                {
                    // The whole frame, found by walking its block headers.
                    let mut frame = Vec::with_capacity((size as usize / 2).max(4096));
                    frame.extend_from_slice(&head);
                    let src = &mut *r;
                    let collected = (|| -> io::Result<()> {
                        loop {
                            let at = frame.len();
                            take(src, 3, &mut frame)?;
                            let (len, last) = block_len([frame[at], frame[at + 1], frame[at + 2]])?;
                            take(src, len - 3, &mut frame)?;
                            if frame.len() as u64 > size + size / 8 + 1024 + header_len as u64 {
                                return Err(invalid(format!("zstd frame longer than its {size} bytes of content")));
                            }
                            if last {
                                return if checksum { take(src, 4, &mut frame) } else { Ok(()) };
                            }
                        }
                    })();
                    if let Err(e) = collected {
                        return fail(e);
                    }
                    let (tx, rx) = sync_channel(size.div_ceil(BLOCK as u64) as usize + 1);
                    if order.send(rx).is_err() || jobs_tx.send(Job { frame, tx }).is_err() {
                        return;
                    }
                }
                FrameHeader::Zstd { .. } => {
                    // Decompressed here, as a stream: zstd stops at the end of the frame.
                    let (tx, rx) = sync_channel(inline_blocks);
                    if order.send(rx).is_err() {
                        return;
                    }
                    let mut src = (&head[..]).chain(&mut *r);
                    match decode_frame(&mut inline, &mut src, &tx, pool) {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                }
            }
        }
    });
}

/// Decompression workers for this machine: the cores but two, up to [`MAX_WORKERS`]. The
/// two are what the rest of an install keeps busy (download and hashing, tar parsing, file
/// writes, the kernel's write-back): on a two-core machine frame-parallel decompression only
/// takes time from them, and the whole install was measured slower with it (0.63 s against
/// 0.58 s, `docs/BENCHMARKS.md`), so there the dispatching thread decompresses every frame
/// itself, as a stream.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).saturating_sub(2).min(MAX_WORKERS)
}

/// The download decompressed on threads of their own, so decompression overlaps with
/// writing; read it as one stream. See the module documentation.
pub struct Decoded<R> {
    order: Option<Receiver<Blocks>>,
    frame: Option<Blocks>,
    pool: Pool,
    cur: Vec<u8>,
    pos: usize,
    thread: Option<JoinHandle<R>>,
}

impl<R: BufRead + Send + 'static> Decoded<R> {
    /// Starts decompressing `src`, keeping up to [`DEFAULT_AHEAD_MIB`] ready.
    pub fn start(src: R) -> io::Result<Decoded<R>> {
        Decoded::start_with_ahead(src, DEFAULT_AHEAD_MIB)
    }

    /// Starts decompressing `src`, keeping up to about `ahead_mib` MiB ready for the reader:
    /// more lets the download and decompression run further ahead of a reader that starts
    /// late. Workers: see [`default_workers`].
    pub fn start_with_ahead(src: R, ahead_mib: usize) -> io::Result<Decoded<R>> {
        Decoded::start_with(src, ahead_mib, default_workers())
    }

    /// As [`Decoded::start_with_ahead`], with `workers` decompression threads (0: the
    /// dispatching thread decompresses every frame itself, as a stream).
    pub fn start_with(src: R, ahead_mib: usize, workers: usize) -> io::Result<Decoded<R>> {
        let frames = (ahead_mib / (IMAGE_FRAME >> 20)).max(1);
        let inline_blocks = (ahead_mib * (1 << 20) / BLOCK).max(1);
        let (order_tx, order_rx) = sync_channel::<Blocks>(frames);
        let pool = Pool::default();
        let p = pool.clone();
        let thread = std::thread::Builder::new().name("image-zstd".into()).spawn(move || {
            let mut src = src;
            dispatch(&mut src, &order_tx, inline_blocks, workers, &p);
            src
        })?;
        Ok(Decoded { order: Some(order_rx), frame: None, pool, cur: Vec::new(), pos: 0, thread: Some(thread) })
    }

    /// Stops decompressing and hands back the source (to drain and hash what is left).
    pub fn into_inner(mut self) -> R {
        drop(self.order.take());
        drop(self.frame.take());
        self.thread.take().expect("joined once").join().expect("zstd thread panicked")
    }
}

impl<R> Read for Decoded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            if self.frame.is_none() {
                let Some(order) = &self.order else { return Ok(0) };
                match order.recv() {
                    Ok(f) => self.frame = Some(f),
                    Err(_) => return Ok(0),
                }
            }
            match self.frame.as_ref().expect("set above").recv() {
                Ok(Ok(b)) => {
                    let spent = std::mem::replace(&mut self.cur, b);
                    self.pool.put(spent);
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    // Nothing after an error: the stream is not to be trusted past it.
                    self.order = None;
                    self.frame = None;
                    return Err(e);
                }
                Err(_) => self.frame = None,
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl<R> Drop for Decoded<R> {
    fn drop(&mut self) {
        // Not joined: the threads end at their next block (the receivers are gone); a stalled
        // source cannot hold up the caller.
        drop(self.order.take());
        drop(self.frame.take());
        drop(self.thread.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// One frame with its content size and checksum in it, as image-builder writes them.
    fn sized_frame(data: &[u8]) -> Vec<u8> {
        let mut c = zstd::bulk::Compressor::new(3).unwrap();
        c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true)).unwrap();
        c.compress(data).unwrap()
    }

    /// One frame that does not say how big its content is (a streaming encoder's).
    fn unsized_frame(data: &[u8]) -> Vec<u8> {
        let mut e = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        e.include_checksum(true).unwrap();
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn skippable(n: usize) -> Vec<u8> {
        let mut v = 0x184D_2A5Au32.to_le_bytes().to_vec();
        v.extend_from_slice(&(n as u32).to_le_bytes());
        v.extend(std::iter::repeat_n(0xAB, n));
        v
    }

    fn data(n: usize, seed: u64) -> Vec<u8> {
        // Compressible but not trivial: words from a small vocabulary, chosen pseudo-randomly.
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(["alpha ", "beta ", "gamma\n", "delta ", "epsilon "][(x % 5) as usize].as_bytes());
            out.push((x >> 40) as u8);
        }
        out.truncate(n);
        out
    }

    /// A source that hands out at most `step` bytes per `fill_buf`: every header and block
    /// boundary lands somewhere inside a read.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        step: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.fill_buf()?.len().min(buf.len());
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.consume(n);
            Ok(n)
        }
    }

    impl BufRead for Trickle {
        fn fill_buf(&mut self) -> io::Result<&[u8]> {
            let end = (self.pos + self.step).min(self.data.len());
            Ok(&self.data[self.pos..end])
        }
        fn consume(&mut self, n: usize) {
            self.pos += n;
        }
    }

    fn decode_all(stream: Vec<u8>, step: usize, workers: usize) -> io::Result<Vec<u8>> {
        let mut d = Decoded::start_with(Trickle { data: stream, pos: 0, step }, 8, workers)?;
        let mut out = Vec::new();
        d.read_to_end(&mut out)?;
        Ok(out)
    }

    /// Frames of every kind: sized ones (collected and decompressed by the workers), an empty
    /// one, a skippable one, one without its size and one too big to collect (both streamed).
    fn mixed() -> (Vec<u8>, Vec<u8>) {
        let parts = [
            data(3 << 20, 1),
            data(0, 2),
            data(IMAGE_FRAME, 3),
            data(1000, 4),
            data(5 << 20, 5),
            data(MAX_PARALLEL_FRAME as usize + 4096, 6),
            data(70_000, 7),
        ];
        let mut stream = Vec::new();
        let mut plain = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            match i {
                4 => stream.extend(unsized_frame(p)),
                _ => stream.extend(sized_frame(p)),
            }
            if i == 1 {
                stream.extend(skippable(100));
                stream.extend(skippable(0));
            }
            plain.extend_from_slice(p);
        }
        (stream, plain)
    }

    #[test]
    fn every_kind_of_frame_decodes_in_order_with_any_number_of_workers() {
        let (stream, plain) = mixed();
        for workers in [0, 1, 2, 3] {
            let out = decode_all(stream.clone(), 1 << 20, workers).unwrap();
            assert!(out == plain, "{workers} workers: {} bytes out, {} expected", out.len(), plain.len());
        }
        // Reads split at every odd place.
        let out = decode_all(stream, 4093, 2).unwrap();
        assert!(out == plain);
    }

    #[test]
    fn tiny_reads_cross_every_header_and_block_boundary() {
        let mut stream = Vec::new();
        let mut plain = Vec::new();
        for i in 0..6 {
            let p = data(i * 40_000 + 3, i as u64);
            stream.extend(if i % 2 == 0 { sized_frame(&p) } else { unsized_frame(&p) });
            stream.extend(skippable(i));
            plain.extend(p);
        }
        for step in [1, 2, 3, 5, 17] {
            assert!(decode_all(stream.clone(), step, 2).unwrap() == plain, "step {step}");
        }
    }

    #[test]
    fn a_damaged_or_cut_stream_is_an_error_never_short_data() {
        let (stream, _) = mixed();
        // A byte flipped inside the first frame's compressed blocks (its checksum fails, or
        // its blocks no longer parse).
        for at in [100, 5000, stream.len() / 3] {
            let mut bad = stream.clone();
            bad[at] ^= 0x55;
            assert!(decode_all(bad, 1 << 20, 2).is_err(), "flipped byte at {at} went unnoticed");
        }
        // Cut inside a collected frame, inside a streamed one, inside a header.
        for cut in [stream.len() / 10, stream.len() - 100, 2] {
            let err = decode_all(stream[..cut].to_vec(), 1 << 20, 2).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "cut at {cut}: {err}");
        }
        // Not zstd at all.
        assert_eq!(decode_all(b"PK\x03\x04 not zstd".to_vec(), 1 << 20, 2).unwrap_err().kind(), io::ErrorKind::InvalidData);
        // Nothing at all is an empty stream.
        assert!(decode_all(Vec::new(), 1 << 20, 2).unwrap().is_empty());
    }

    #[test]
    fn headers_give_content_size_and_checksum_flag() {
        for n in [0usize, 1, 255, 256, 65_791, 65_792, 1 << 20] {
            let f = sized_frame(&data(n, 9));
            match parse_header(&f).unwrap() {
                Ok(FrameHeader::Zstd { content_size, checksum, header_len }) => {
                    assert_eq!(content_size, Some(n as u64), "{n}");
                    assert!(checksum);
                    assert!(parse_header(&f[..header_len - 1]).unwrap().is_err(), "one byte short is not a header");
                }
                other => panic!("{n}: {other:?}"),
            }
        }
        let f = unsized_frame(b"abc");
        assert!(matches!(parse_header(&f).unwrap(), Ok(FrameHeader::Zstd { content_size: None, .. })));
        assert_eq!(parse_header(&skippable(5)).unwrap(), Ok(FrameHeader::Skippable { total: 13 }));
        assert_eq!(parse_header(&[0x28]).unwrap(), Err(4));
    }

    #[test]
    fn into_inner_hands_back_the_source_where_decompression_stopped() {
        let mut stream = sized_frame(&data(100, 1));
        stream.extend_from_slice(&[0u8; 1024]);
        let mut d = Decoded::start_with(io::Cursor::new(stream.clone()), 8, 2).unwrap();
        let mut first = [0u8; 10];
        d.read_exact(&mut first).unwrap();
        // The zero bytes after the frame are not zstd: reading on fails…
        assert!(d.read_to_end(&mut Vec::new()).is_err());
        // …and the source is still there for the caller to drain.
        let mut src = d.into_inner();
        let mut rest = Vec::new();
        src.read_to_end(&mut rest).unwrap();
        assert!(rest.len() <= 1024);
    }
}
