//! The RAM store: one export's bytes, and the only module with `unsafe` code.
//!
//! Layers, from the bottom:
//! * [`backing`]: where the bytes live and how pages are given back: an anonymous private
//!   mapping, or a memfd mapped shared that can outlive the process ([`BackingKind`]).
//! * [`os`]: the system calls on the store's own mappings (mlock, munlock, madvise, mincore,
//!   hole punching), each wrapped once with a range check.
//! * [`alloc_map`]: one bit per page — held or a hole — shared lock-free as atomics.
//! * [`chunks`]: chunk locks whose guards are the only way to touch the bytes.
//! * [`budget`]: memory caps and the reservations that take room before anything changes.
//! * this module: the public API — [`RamDisk`] reads, writes, zeroes and reports extents, and
//!   [`Update`] applies a write or a zeroing in steps (a streamed payload, or a huge range).
//!
//! # Soundness argument for concurrent access
//!
//! Many tasks on several threads read and write one mapping at once (pipelined requests,
//! several connections). Rust forbids a `&mut [u8]` while anything else reads or writes the
//! same bytes, and forbids unsynchronised concurrent non-atomic accesses. So:
//!
//! * The mapping is held as [`memmap2::MmapRaw`], which only hands out raw pointers. The only
//!   code that dereferences them is in `chunks`, in methods of a read or write guard of the chunk
//!   concerned, which assert that their range lies inside that chunk (and so inside the
//!   export). A copy out holds the chunk's read lock; a copy in, a zero fill, a zero check and
//!   a page discard hold its write lock. No reference into the mapping outlives one such call.
//! * The unsafe calls that change memory underneath (`Backing::discard`, `os::drop_pages`,
//!   `os::punch_hole`) are `unsafe fn`s whose contract — exclusive access to the range — only a
//!   write guard can meet.
//!   The other system calls (mlock, munlock, mincore) read or change no data and are wrapped
//!   as safe functions that check their range.
//! * The allocation map is atomics only, so any access is sound; consistency between a bit and
//!   its page's bytes comes from changing bits only through the chunk's write guard.
//! * Each operation holds one guard at a time, never across an `.await`, so there is no lock
//!   order to get wrong. A request that spans chunks is therefore not atomic against an
//!   overlapping concurrent request; NBD does not promise that (replies may come in any order
//!   and overlapping in-flight requests have no defined outcome), but every byte access is
//!   race-free.
//!
//! So no safe function of the store, called with any arguments, can cause undefined behaviour:
//! bad ranges panic, and callers (the session) validate requests before they get here.
//!
//! # Memory behaviour
//!
//! A page costs RAM only once it holds data. Reads of pages the allocation map knows to be
//! holes are served as zeroes without touching the mapping. Whole pages written with zeroes
//! are not stored (and are given back if they were held); a held page that zero writes or
//! trims leave all zero is given back too. TRIM and WRITE_ZEROES give back the pages wholly
//! inside their range and zero the edges; WRITE_ZEROES with `NO_HOLE` writes real zeroes and
//! keeps the pages ([`ZeroMode`]). A [`MemoryBudget`] caps the pages an export (and, shared,
//! all exports) may hold: an operation that could need more fails with [`NoSpace`] before it
//! changes anything.

#![allow(unsafe_code)]

mod alloc_map;
mod backing;
mod budget;
mod chunks;
mod dirty;
mod os;

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;

pub use budget::{MemoryBudget, NoSpace};
pub use dirty::{Copied, Pause, Snapshot, SnapshotError};

use alloc_map::AllocationMap;
use backing::{Anonymous, Backing, Memfd, Policy};
use budget::{Budgets, Reservation};
use chunks::{Chunks, WriteGuard};

/// The allocation granularity the store tracks and releases: the kernel's base page.
pub const PAGE_SIZE: u64 = 4096;
/// Pages per allocation-map word; also the pages per locking chunk.
const PAGES_PER_CHUNK: u64 = 64;
/// Bytes covered by one lock and one allocation-map word (256 KiB).
pub const CHUNK_SIZE: u64 = PAGE_SIZE * PAGES_PER_CHUNK;

/// Most bytes of range one [`Update::zero_step`] covers.
const ZERO_STEP_SPAN: u64 = 4 << 30;
/// Most chunks one [`Update::zero_step`] changes. Together with the span this bounds a step to
/// about a millisecond, so a 1 TiB WRITE_ZEROES never keeps a runtime thread from other
/// connections for long.
const ZERO_STEP_CHUNKS: u32 = 64;

/// How a disk's memory is managed.
#[derive(Debug, Clone, Default)]
pub struct MemoryOptions {
    /// Caps to count pages against; empty means unlimited.
    pub budgets: Vec<Arc<MemoryBudget>>,
    /// Lock pages in RAM as they are first written (`mlock2(MLOCK_ONFAULT)`).
    pub mlock: bool,
    /// Advise transparent huge pages.
    pub hugepages: bool,
    /// Where the bytes live.
    pub backing: BackingKind,
    /// What the memory is for (the export's name): labels a memfd in /proc/PID/fd.
    pub name: String,
}

/// Where a disk's bytes live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BackingKind {
    /// Private anonymous memory: gone when the process ends.
    #[default]
    Anonymous,
    /// A memfd: survives the process while another holds its descriptor (a service manager's
    /// file-descriptor store), and can be adopted by the next one ([`RamDisk::adopt`]).
    Memfd,
}

/// The state of a run of pages, as `base:allocation` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// Never written, trimmed or zeroed: reads as zero and costs no RAM.
    Hole,
    /// Holds data (possibly zeroes written with `NO_HOLE`).
    Data,
}

/// What zeroing leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroMode {
    /// Pages wholly inside the range are given back and become holes (TRIM, WRITE_ZEROES).
    Release,
    /// Zeroes are written and the pages stay allocated (WRITE_ZEROES with `NO_HOLE`).
    Allocate,
}

/// A fixed-size RAM region with an allocation map; see the module documentation.
#[derive(Debug)]
pub struct RamDisk {
    size: u64,
    chunks: Chunks,
    budgets: Budgets,
    /// Which pages changed since the last snapshot pass (see `dirty`).
    dirty: dirty::DirtyLog,
}

impl RamDisk {
    /// Reserves (but does not populate) `size` bytes of address space, with no memory policy.
    pub fn new(size: u64) -> io::Result<Self> {
        Self::with_options(size, &MemoryOptions::default())
    }

    /// Reserves `size` bytes of address space and applies the memory policy. Fails with a
    /// message naming RLIMIT_MEMLOCK when `mlock` is asked for beyond the locked-memory limit.
    pub fn with_options(size: u64, options: &MemoryOptions) -> io::Result<Self> {
        let map = Self::empty_map(size)?;
        let policy = Policy::of(options);
        let backing: Box<dyn Backing> = match options.backing {
            BackingKind::Anonymous => Box::new(Anonymous::new(size, policy)?),
            BackingKind::Memfd => Box::new(Memfd::create(&options.name, size, policy)?),
        };
        Ok(Self {
            size,
            chunks: Chunks::new(size, backing, map),
            budgets: Budgets::new(options.budgets.clone()),
            dirty: Default::default(),
        })
    }

    /// Takes over the memfd of an export of `size` bytes that an earlier process created (and
    /// a service manager kept): maps it as it is, without touching the data, and rebuilds the
    /// allocation map from the file's extents (`SEEK_DATA`/`SEEK_HOLE`; a page is held if any
    /// byte of it is data). Its held pages count against `options.budgets`; the backing kind
    /// and name in `options` are ignored (the file is a memfd already).
    ///
    /// Fails, leaving the data as they were, if `fd` is not a regular file of exactly `size`
    /// rounded up to whole pages that can be sealed against size changes, or if its data
    /// exceed a memory cap. With `options.mlock`, the adopted pages are locked as they are next
    /// touched (`MLOCK_ONFAULT`), not here.
    pub fn adopt(fd: OwnedFd, size: u64, options: &MemoryOptions) -> io::Result<Self> {
        let map = Self::empty_map(size)?;
        let backing = Memfd::adopt(fd, size, Policy::of(options))?;
        let mut held = 0;
        for data in backing.data_ranges()? {
            let pages = data.start / PAGE_SIZE..data.end.div_ceil(PAGE_SIZE);
            held += map.set_pages(pages);
        }
        let budgets = Budgets::new(options.budgets.clone());
        let mut reservation = budgets.reserve(held).map_err(|NoSpace| {
            let caps: Vec<String> = options
                .budgets
                .iter()
                .map(|b| format!("{} of {} bytes in use", b.used_bytes(), b.limit_bytes()))
                .collect();
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!(
                    "the adopted memfd holds {} bytes of data, more than a memory cap allows \
                     ({}): raise max-memory (the server's or the export's)",
                    held * PAGE_SIZE,
                    caps.join(", ")
                ),
            )
        })?;
        reservation.allocated(held);
        drop(reservation);
        Ok(Self {
            size,
            chunks: Chunks::new(size, Box::new(backing), map),
            budgets,
            dirty: Default::default(),
        })
    }

    /// The memfd behind the disk, to hand to a service manager's file-descriptor store so the
    /// data outlive this process; `None` for anonymous memory.
    pub fn backing_fd(&self) -> Option<BorrowedFd<'_>> {
        self.chunks.backing().fd()
    }

    /// An allocation map for an export of `size` bytes, all holes.
    fn empty_map(size: u64) -> io::Result<AllocationMap> {
        if size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "export size is zero",
            ));
        }
        let words = usize::try_from(size.div_ceil(CHUNK_SIZE))
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "export size too large"))?;
        AllocationMap::new(words)
    }

    /// The export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of pages the store holds data for (what the RAM disk really costs, give or take
    /// pages the kernel has not yet reclaimed).
    pub fn allocated_bytes(&self) -> u64 {
        self.chunks.map().allocated_pages() * PAGE_SIZE
    }

    /// Fills `dst` with the bytes at `offset`.
    ///
    /// # Panics
    /// If the range is outside the export; callers validate requests first.
    pub fn read(&self, offset: u64, dst: &mut [u8]) {
        self.check_range(offset, dst.len() as u64);
        let mut done = 0;
        for piece in pieces(offset, dst.len() as u64) {
            let out = &mut dst[done..done + piece.len as usize];
            done += piece.len as usize;
            let guard = self.chunks.read(piece.chunk);
            // Held pages are copied one page at a time even when the whole chunk is held:
            // measured here, one 256 KiB copy per chunk cost about 6 % more server CPU per
            // 1 MiB READ than page-sized copies.
            match guard.allocated() {
                0 => out.fill(0),
                bits => {
                    for page in piece.pages() {
                        let at = (page.offset - piece.offset) as usize;
                        let part = &mut out[at..at + page.len as usize];
                        if bits & page.bit == 0 {
                            part.fill(0);
                        } else {
                            guard.copy_out(page.offset, part);
                        }
                    }
                }
            }
        }
    }

    /// Sends up to `len` bytes at `offset` to the stream socket `socket`, without waiting:
    /// the one-copy path for large READ data (the kernel copies from the store's pages into
    /// its socket buffer, where [`RamDisk::read`] needs a send buffer in between). Held pages
    /// go from the mapping; holes are sent from a static zero page, so reading a hole never
    /// makes it take RAM (a memfd's read fault would). Returns the bytes the socket took
    /// (fewer than `len` when it filled up), or `WouldBlock` if it took none.
    ///
    /// # Panics
    /// If the range is outside the export.
    pub fn send(&self, offset: u64, len: u64, socket: BorrowedFd<'_>) -> io::Result<usize> {
        self.check_range(offset, len);
        let mut sent = 0;
        for piece in pieces(offset, len) {
            let guard = self.chunks.read(piece.chunk);
            let bits = guard.allocated();
            // Runs of pages in one state, one send each.
            let mut runs = Vec::with_capacity(4);
            for page in piece.pages() {
                let held = bits & page.bit != 0;
                match runs.last_mut() {
                    Some((_, run_len, run_held)) if *run_held == held => *run_len += page.len,
                    _ => runs.push((page.offset, page.len, held)),
                }
            }
            for (at, run_len, held) in runs {
                let taken = if held {
                    guard.send(at, run_len as usize, socket)
                } else {
                    send_zeroes(socket, run_len as usize)
                };
                match taken {
                    Ok(n) => {
                        sent += n;
                        if (n as u64) < run_len {
                            return Ok(sent);
                        }
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock && sent > 0 => {
                        return Ok(sent);
                    }
                    Err(err) => return Err(err),
                }
            }
        }
        Ok(sent)
    }

    /// Writes `data` at `offset`, or fails with [`NoSpace`] before changing anything if the
    /// pages it would newly hold (those with non-zero data) exceed a cap.
    ///
    /// # Panics
    /// If the range is outside the export; callers validate requests first.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), NoSpace> {
        self.check_range(offset, data.len() as u64);
        let needed = if self.budgets.is_unlimited() {
            0
        } else {
            self.pages_needed(offset, data)
        };
        let mut update = Update::new(self, offset, data.len() as u64, UpdateKind::Write, needed)?;
        update.write(data);
        Ok(())
    }

    /// Starts a write of `len` bytes at `offset` whose data arrive later, in pieces (a payload
    /// streamed from the network). Room is reserved for every page of the range not held yet,
    /// since the data are not known; what zero pages did not use goes back when the update
    /// ends.
    ///
    /// # Panics
    /// If the range is outside the export.
    pub fn start_write(&self, offset: u64, len: u64) -> Result<Update<'_>, NoSpace> {
        self.check_range(offset, len);
        let needed = if self.budgets.is_unlimited() {
            0
        } else {
            self.unheld_pages(offset, len)
        };
        Update::new(self, offset, len, UpdateKind::Write, needed)
    }

    /// Starts zeroing `len` bytes at `offset`, to be done in steps ([`Update::zero_step`]).
    /// Only [`ZeroMode::Allocate`] needs room: every page not held yet.
    ///
    /// # Panics
    /// If the range is outside the export.
    pub fn start_zero(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<Update<'_>, NoSpace> {
        self.check_range(offset, len);
        let needed = if mode == ZeroMode::Release || self.budgets.is_unlimited() {
            0
        } else {
            self.unheld_pages(offset, len)
        };
        Update::new(self, offset, len, UpdateKind::Zero(mode), needed)
    }

    /// Makes `[offset, offset + len)` read as zeroes, all at once.
    ///
    /// # Panics
    /// If the range is outside the export.
    pub fn zero(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<(), NoSpace> {
        let mut update = self.start_zero(offset, len, mode)?;
        while !update.zero_step() {}
        Ok(())
    }

    /// The runs of equal state in `[offset, offset + len)`, in order, page-aligned inside and
    /// clipped to the range at its ends. Lock-free and lazy: take as many as a reply holds. A
    /// result may lag a request still in flight, as the protocol allows.
    ///
    /// # Panics
    /// If the range is outside the export.
    pub fn extents(&self, offset: u64, len: u64) -> Extents<'_> {
        self.check_range(offset, len);
        Extents {
            map: self.chunks.map(),
            pos: offset,
            end: offset + len,
        }
    }

    /// Bytes of the data region the kernel really holds in RAM (`mincore`), looked up only
    /// around pages the allocation map knows of, in 2 MiB windows so that transparent huge
    /// pages are counted whole. Costs in proportion to the data held, not the export size.
    pub fn resident_bytes(&self) -> u64 {
        const WINDOW: u64 = 2 << 20;
        let words_per_window = (WINDOW / CHUNK_SIZE) as usize;
        let map = self.chunks.map();
        let mapping = self.chunks.backing().map();
        let mut status = Vec::new();
        let mut resident = 0;
        for first in (0..map.words()).step_by(words_per_window) {
            let last = (first + words_per_window).min(map.words());
            if (first..last).all(|w| map.bits(w as u64) == 0) {
                continue;
            }
            let start = first * CHUNK_SIZE as usize;
            let end = (start + WINDOW as usize).min(mapping.len());
            resident += os::resident_pages(mapping, start..end, &mut status);
        }
        resident * PAGE_SIZE
    }

    fn check_range(&self, offset: u64, len: u64) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.size),
            "range {offset}+{len} outside a {}-byte export",
            self.size
        );
    }

    /// Pages a write would newly populate: those holding non-zero data that are not held
    /// yet. Read without locks, so concurrent requests can make it inexact; the reservation
    /// squares the caps with what really happened.
    fn pages_needed(&self, offset: u64, data: &[u8]) -> u64 {
        let map = self.chunks.map();
        let mut needed = 0;
        for piece in pieces(offset, data.len() as u64) {
            let bits = map.bits(piece.chunk);
            for page in piece.pages() {
                let at = (page.offset - offset) as usize;
                if bits & page.bit == 0 && !is_zero(&data[at..at + page.len as usize]) {
                    needed += 1;
                }
            }
        }
        needed
    }

    /// Pages of the range not held yet (lock-free, like `pages_needed`).
    fn unheld_pages(&self, offset: u64, len: u64) -> u64 {
        let map = self.chunks.map();
        pieces(offset, len)
            .map(|piece| u64::from((piece.page_bits() & !map.bits(piece.chunk)).count_ones()))
            .sum()
    }
}

impl Drop for RamDisk {
    /// The disk's pages no longer count against the caps it shared (a memfd's data may live
    /// on in a service manager's store, but then the next process that adopts them counts
    /// them).
    fn drop(&mut self) {
        self.budgets.released(self.chunks.map().allocated_pages());
    }
}

/// What an update does to its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpdateKind {
    Write,
    Zero(ZeroMode),
}

/// What an update puts into the pages it covers.
#[derive(Debug, Clone, Copy)]
enum Fill<'a> {
    /// These bytes (zero pages among them are not stored).
    Bytes(&'a [u8]),
    Zeroes(ZeroMode),
}

/// What to do to one page for one part of an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageChange {
    /// Nothing: the page is a hole and is to read as zero.
    Keep,
    /// Copy the bytes (or write the zeroes) in, and mark the page held.
    Store,
    /// The whole page is to read as zero: give it back.
    Release,
    /// Part of a held page is to read as zero: zero it, and give the page back if nothing else
    /// in it is left.
    ZeroPart,
}

/// The one rule for writes and zeroing. `held`: the page's allocation bit; `whole`: the part
/// covers all of the page.
fn page_change(held: bool, whole: bool, fill: Fill<'_>) -> PageChange {
    let zeroes = match fill {
        Fill::Bytes(bytes) => is_zero(bytes),
        Fill::Zeroes(ZeroMode::Release) => true,
        Fill::Zeroes(ZeroMode::Allocate) => return PageChange::Store,
    };
    match (zeroes, held, whole) {
        (false, _, _) => PageChange::Store,
        (true, false, _) => PageChange::Keep,
        (true, true, true) => PageChange::Release,
        (true, true, false) => PageChange::ZeroPart,
    }
}

/// A write or a zeroing of one range in progress, applied in order in as many steps as the
/// caller likes. Room in the memory caps was reserved for all of it before the first byte
/// changed; dropping the update (finished, or abandoned half way when a client goes away,
/// which leaves the range partly updated, as a power cut would) squares the caps.
#[derive(Debug)]
pub struct Update<'a> {
    disk: &'a RamDisk,
    pos: u64,
    end: u64,
    kind: UpdateKind,
    reservation: Reservation,
}

impl<'a> Update<'a> {
    fn new(
        disk: &'a RamDisk,
        offset: u64,
        len: u64,
        kind: UpdateKind,
        needed: u64,
    ) -> Result<Self, NoSpace> {
        Ok(Self {
            disk,
            pos: offset,
            end: offset + len,
            kind,
            reservation: disk.budgets.reserve(needed)?,
        })
    }

    /// Bytes of the range not yet updated.
    pub fn remaining(&self) -> u64 {
        self.end - self.pos
    }

    /// Writes the next `data.len()` bytes of a write's range.
    ///
    /// # Panics
    /// If this update is a zeroing, or `data` runs past the range.
    pub fn write(&mut self, data: &[u8]) {
        assert_eq!(self.kind, UpdateKind::Write, "not a write");
        assert!(data.len() as u64 <= self.remaining(), "data past the range");
        let mut done = 0;
        for piece in pieces(self.pos, data.len() as u64) {
            let part = &data[done..done + piece.len as usize];
            done += piece.len as usize;
            self.apply(piece, Fill::Bytes(part));
        }
        self.pos += data.len() as u64;
    }

    /// Receives the next bytes of a write's range straight from the stream socket `socket`
    /// into the store, until the range is done or no more bytes are waiting: the one-copy path
    /// for large payloads (the kernel copies from its socket buffer into the store's pages,
    /// where [`Update::write`] needs the payload in a buffer first). Never waits: returns the
    /// bytes received (none if the peer closed the stream) and whether the socket was found
    /// empty, or a `WouldBlock` error if no bytes were waiting.
    ///
    /// The page rule holds as for [`Update::write`] once a page's part of the range has
    /// arrived: a page left all zero is given back (or was never kept), so zero pages still
    /// cost no RAM. Bytes land before they can be inspected, so a page is marked held while
    /// its part arrives; a write abandoned half way (the client went away) can leave the page
    /// it stopped in held even if it reads as zero, as a power cut would leave a torn write.
    ///
    /// # Panics
    /// If this update is a zeroing.
    pub fn receive(&mut self, socket: BorrowedFd<'_>) -> io::Result<Received> {
        assert_eq!(self.kind, UpdateKind::Write, "not a write");
        let mut received = Received {
            bytes: 0,
            drained: false,
        };
        while self.pos < self.end {
            let piece = pieces(self.pos, self.end - self.pos)
                .next()
                .expect("a piece");
            match self.receive_piece(piece, socket) {
                Ok(0) => break,
                // Fewer bytes than asked for: the socket had no more (a stream socket's recv
                // without waiting returns all it holds, up to the length asked for).
                Ok(n) if (n as u64) < piece.len => {
                    received.bytes += n;
                    received.drained = true;
                    break;
                }
                Ok(n) => received.bytes += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock && received.bytes > 0 => {
                    received.drained = true;
                    break;
                }
                Err(err) => return Err(err),
            }
        }
        Ok(received)
    }

    /// Receives into one piece under its chunk's write lock: see [`Update::receive`].
    fn receive_piece(&mut self, piece: Piece, socket: BorrowedFd<'_>) -> io::Result<usize> {
        let mut guard = self.disk.chunks.write(piece.chunk);
        self.disk.dirty.mark(piece.chunk, piece.page_bits());
        let holes = piece.page_bits() & !guard.allocated();
        if holes != 0 {
            // As for a write (`populate_runs`): the holes that the bytes already waiting will
            // fill are populated in runs, instead of one page fault each during the recv. Only
            // those: every page populated here is reached by the bytes received and so marked
            // held below (the page rule then gives back any that stay zero).
            let waiting = rustix::io::ioctl_fionread(socket).unwrap_or(0);
            if waiting > 0 {
                let coming = Piece {
                    len: waiting.min(piece.len),
                    ..piece
                };
                populate_runs(&mut guard, piece.chunk, coming.page_bits() & holes);
            }
        }
        let n = guard.receive(piece.offset, piece.len as usize, socket)?;
        if n == 0 {
            return Ok(0);
        }
        let arrived = Piece {
            len: n as u64,
            ..piece
        };
        // The bytes may be anything: the pages they reached are held from now on (bit and
        // bytes agree for every reader, who takes this lock after us).
        let newly = guard.mark_allocated(arrived.page_bits());
        let mut releases = Releases::default();
        for page in arrived.pages() {
            let page_span = guard.page_span(page.start());
            let part_end = page_span.end.min(self.end);
            // A page whose part is complete: all zero, it is not kept (the page rule's Keep
            // for a hole, Release or ZeroPart for a held page).
            if part_end <= arrived.offset + arrived.len && guard.is_zero(page_span.clone()) {
                releases.add(&mut guard, page_span);
            }
        }
        let freed = releases.flush(&mut guard);
        drop(guard);
        self.disk.budgets.released(freed);
        self.reservation.allocated(newly);
        self.pos += n as u64;
        Ok(n)
    }

    /// Zeroes the next part of a zeroing's range, a bounded amount of work; returns whether
    /// the whole range is done.
    ///
    /// # Panics
    /// If this update is a write.
    pub fn zero_step(&mut self) -> bool {
        let UpdateKind::Zero(mode) = self.kind else {
            panic!("not a zeroing");
        };
        let (mut span, mut changed) = (0, 0);
        while self.pos < self.end && span < ZERO_STEP_SPAN && changed < ZERO_STEP_CHUNKS {
            let piece = pieces(self.pos, self.end - self.pos)
                .next()
                .expect("a piece");
            // A chunk with nothing held already reads as zero, and holes are wanted.
            if mode == ZeroMode::Allocate || self.disk.chunks.map().bits(piece.chunk) != 0 {
                self.apply(piece, Fill::Zeroes(mode));
                changed += 1;
            }
            span += piece.len;
            self.pos += piece.len;
        }
        self.pos == self.end
    }

    /// Applies `fill` to one piece, page by page, under the piece's chunk write lock: first the
    /// page rule decides every page, then the holes about to be stored into are populated in
    /// runs (see [`populate_runs`]), then the pages change.
    fn apply(&mut self, piece: Piece, fill: Fill<'_>) {
        let mut guard = self.disk.chunks.write(piece.chunk);
        self.disk.dirty.mark(piece.chunk, piece.page_bits());
        let held = guard.allocated();
        let part_of = |page: &PagePart| match fill {
            Fill::Bytes(bytes) => {
                let at = (page.offset - piece.offset) as usize;
                Fill::Bytes(&bytes[at..at + page.len as usize])
            }
            zeroes => zeroes,
        };
        let mut changes = [PageChange::Keep; PAGES_PER_CHUNK as usize];
        let mut fresh = 0u64;
        for (change, page) in changes.iter_mut().zip(piece.pages()) {
            let whole = (page.offset..page.offset + page.len) == guard.page_span(page.start());
            *change = page_change(held & page.bit != 0, whole, part_of(&page));
            if *change == PageChange::Store && held & page.bit == 0 {
                fresh |= page.bit;
            }
        }
        populate_runs(&mut guard, piece.chunk, fresh);
        let mut releases = Releases::default();
        let mut stored = 0u64;
        for (&change, page) in changes.iter().zip(piece.pages()) {
            let range = page.offset..page.offset + page.len;
            let page_span = guard.page_span(page.start());
            match change {
                PageChange::Keep => continue,
                PageChange::Store => {
                    match part_of(&page) {
                        Fill::Bytes(bytes) => guard.copy_in(page.offset, bytes),
                        Fill::Zeroes(_) => guard.fill_zero(range),
                    }
                    stored |= page.bit;
                    continue;
                }
                PageChange::Release => {}
                PageChange::ZeroPart => {
                    guard.fill_zero(range);
                    if !guard.is_zero(page_span.clone()) {
                        continue;
                    }
                }
            }
            releases.add(&mut guard, page_span);
        }
        let freed = releases.flush(&mut guard);
        let newly = guard.mark_allocated(stored);
        drop(guard);
        self.disk.budgets.released(freed);
        self.reservation.allocated(newly);
    }
}

/// Shortest run of holes worth one `MADV_POPULATE_WRITE`: a single page costs one fault either
/// way, and the system call saves nothing.
const POPULATE_MIN_PAGES: u32 = 2;

/// Populates the pages of `chunk` whose bits are set in `fresh` (holes about to be stored
/// into), one system call per contiguous run of at least [`POPULATE_MIN_PAGES`] pages, instead
/// of the page fault per 4 KiB page that the copies would take: on a first fill the faults are
/// most of the cost. Only pages about to hold data are populated, so zero pages in a write
/// still cost nothing, and the caps (reserved before) see the same pages as without it.
fn populate_runs(guard: &mut WriteGuard<'_>, chunk: u64, fresh: u64) {
    let mut left = fresh;
    while left != 0 {
        let first = left.trailing_zeros();
        let count = (left >> first).trailing_ones();
        left = if first + count == 64 {
            0
        } else {
            left & !(((1u64 << count) - 1) << first)
        };
        if count < POPULATE_MIN_PAGES {
            continue;
        }
        let start = chunk * CHUNK_SIZE + u64::from(first) * PAGE_SIZE;
        let last = start + u64::from(count - 1) * PAGE_SIZE;
        if !guard.populate(start..guard.page_span(last).end) {
            return;
        }
    }
}

/// What one [`Update::receive`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes received into the store (0: the peer had closed the stream).
    pub bytes: usize,
    /// The socket was found empty: waiting for it to become readable again is right, and
    /// another receive now would only fail with `WouldBlock`.
    pub drained: bool,
}

/// Pages to give back, collected into contiguous runs so that one system call covers many.
#[derive(Debug, Default)]
struct Releases {
    run: Option<std::ops::Range<u64>>,
    freed: u64,
}

impl Releases {
    fn add(&mut self, guard: &mut WriteGuard<'_>, page: std::ops::Range<u64>) {
        match &mut self.run {
            Some(run) if run.end == page.start => run.end = page.end,
            _ => {
                self.flush(guard);
                self.run = Some(page);
            }
        }
    }

    /// Gives back the run collected so far; returns the pages freed by every run.
    fn flush(&mut self, guard: &mut WriteGuard<'_>) -> u64 {
        if let Some(run) = self.run.take() {
            self.freed += guard.discard(run);
        }
        self.freed
    }
}

/// Runs of equal state in a range: see [`RamDisk::extents`].
#[derive(Debug)]
pub struct Extents<'a> {
    map: &'a AllocationMap,
    pos: u64,
    end: u64,
}

impl Iterator for Extents<'_> {
    type Item = (u64, Extent);

    fn next(&mut self) -> Option<(u64, Extent)> {
        if self.pos >= self.end {
            return None;
        }
        let start = self.pos;
        let state_at = |bits: u64, pos: u64| {
            if bits & page_bit(pos) == 0 {
                Extent::Hole
            } else {
                Extent::Data
            }
        };
        let state = state_at(self.map.bits(start / CHUNK_SIZE), start);
        let uniform = if state == Extent::Hole { 0 } else { u64::MAX };
        while self.pos < self.end {
            let chunk = self.pos / CHUNK_SIZE;
            let bits = self.map.bits(chunk);
            // A whole word in this state: jump over the rest of its chunk at once.
            let next = if bits == uniform {
                (chunk + 1) * CHUNK_SIZE
            } else if state_at(bits, self.pos) == state {
                (self.pos / PAGE_SIZE + 1) * PAGE_SIZE
            } else {
                break;
            };
            self.pos = next.min(self.end);
        }
        Some((self.pos - start, state))
    }
}

/// Sends up to `len` zero bytes to `socket` without waiting; see [`RamDisk::send`].
fn send_zeroes(socket: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];
    let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
    let mut sent = 0;
    while sent < len {
        let part = (len - sent).min(ZEROES.len());
        match rustix::net::send(socket, &ZEROES[..part], flags) {
            Ok(n) => {
                sent += n;
                if n < part {
                    break;
                }
            }
            Err(err) if sent > 0 && err == rustix::io::Errno::AGAIN => break,
            Err(err) => return Err(err.into()),
        }
    }
    Ok(sent)
}

/// Fast all-zero test: OR-folding fixed blocks vectorises well, and random data exits at the
/// first block.
fn is_zero(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(64);
    let whole = blocks
        .by_ref()
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0);
    whole && blocks.remainder().iter().all(|&b| b == 0)
}

/// The allocation bit of the page holding `offset`, within its chunk's word.
fn page_bit(offset: u64) -> u64 {
    1 << ((offset % CHUNK_SIZE) / PAGE_SIZE)
}

/// The part of a range inside one chunk.
#[derive(Debug, Clone, Copy)]
struct Piece {
    chunk: u64,
    offset: u64,
    len: u64,
}

/// The part of a piece inside one page.
#[derive(Debug, Clone, Copy)]
struct PagePart {
    offset: u64,
    len: u64,
    bit: u64,
}

impl PagePart {
    fn start(&self) -> u64 {
        self.offset / PAGE_SIZE * PAGE_SIZE
    }
}

impl Piece {
    fn pages(self) -> impl Iterator<Item = PagePart> {
        split(self.offset, self.len, PAGE_SIZE).map(|(offset, len)| PagePart {
            offset,
            len,
            bit: page_bit(offset),
        })
    }

    /// The allocation bits of the pages this piece touches.
    fn page_bits(self) -> u64 {
        let first = (self.offset % CHUNK_SIZE) / PAGE_SIZE;
        let last = ((self.offset + self.len - 1) % CHUNK_SIZE) / PAGE_SIZE;
        match last - first + 1 {
            PAGES_PER_CHUNK => u64::MAX,
            count => ((1 << count) - 1) << first,
        }
    }
}

/// Splits a range into chunk pieces.
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = Piece> {
    split(offset, len, CHUNK_SIZE).map(|(offset, len)| Piece {
        chunk: offset / CHUNK_SIZE,
        offset,
        len,
    })
}

/// Splits `[offset, offset + len)` at multiples of `unit`.
fn split(offset: u64, len: u64, unit: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        (pos < end).then(|| {
            let next = ((pos / unit + 1) * unit).min(end);
            let part = (pos, next - pos);
            pos = next;
            part
        })
    })
}

#[cfg(test)]
mod tests;
