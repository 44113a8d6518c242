//! The RAM store: one anonymous private mapping per export, and the only module with `unsafe`.
//!
//! # Soundness argument for concurrent access
//!
//! Many tasks on several threads read and write one mapping at once (pipelined requests, several
//! connections). Rust forbids a `&mut [u8]` while anything else reads or writes the same bytes,
//! and forbids unsynchronised concurrent non-atomic accesses. So:
//!
//! * The mapping is held as [`MmapRaw`], which only hands out raw pointers; no reference into the
//!   data region outlives a single copy below.
//! * The device is cut into [`CHUNK_SIZE`] chunks. Every chunk is guarded by one of
//!   [`LOCK_COUNT`] cache-padded `RwLock`s (chunk index modulo the lock count, so a 1 TiB export
//!   costs no more lock memory than a small one). A copy out of the mapping holds the chunk's
//!   read lock; a copy into it, a `madvise(MADV_DONTNEED)` or a zero fill holds its write lock.
//!   Each operation touches one chunk at a time and holds exactly one lock, so there is no lock
//!   ordering to get wrong and no guard lives across an `.await` (this API is synchronous).
//!   A request that spans chunks is therefore not atomic against an overlapping concurrent
//!   request; NBD does not promise that (replies may come in any order and overlapping in-flight
//!   requests have no defined outcome), but every byte access is race-free.
//! * The allocation map (one bit per 4 KiB page) lives in a second anonymous mapping viewed as
//!   `AtomicU64` words, so it is shared safely without locks. One word covers exactly one chunk,
//!   and a word is only modified under its chunk's write lock, which makes the
//!   bit-then-data bookkeeping consistent for readers holding the read lock.
//!
//! # Memory behaviour
//!
//! The mapping is `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`: the kernel gives a page RAM on
//! its first write, so a 1 TiB export starts instantly and costs nothing until written. Reads of
//! pages the allocation map knows to be unwritten are served as zeroes without touching the
//! mapping. Whole pages written with zeroes are not populated (and are released if they were),
//! and TRIM / WRITE_ZEROES release the page-aligned middle of their range with `MADV_DONTNEED`,
//! which returns the RAM to the kernel and makes the pages read back as zero.
//!
//! Memory policy ([`MemoryOptions`]): a [`MemoryBudget`] caps the pages an export (and, shared,
//! all exports) may hold — a write that would need more fails with [`NoSpace`] before it changes
//! anything; `mlock` locks pages as they fault in (`mlock2(MLOCK_ONFAULT)`), so nothing is ever
//! swapped; `hugepages` asks for transparent huge pages. The regions are always
//! `MADV_DONTDUMP`: a core dump of a server holding 100 GiB of disk contents helps no one.

#![allow(unsafe_code)]

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use memmap2::{Advice, MmapOptions, MmapRaw, UncheckedAdvice};

/// The allocation granularity the store tracks and releases: the kernel's base page.
pub const PAGE_SIZE: u64 = 4096;
/// Pages per allocation-map word; also the pages per locking chunk.
const PAGES_PER_WORD: u64 = 64;
/// Bytes covered by one lock and one allocation-map word (256 KiB).
pub const CHUNK_SIZE: u64 = PAGE_SIZE * PAGES_PER_WORD;
/// Number of chunk locks, whatever the export size.
const LOCK_COUNT: usize = 1024;

/// One chunk lock on its own cache line, so that neighbouring locks taken by different threads
/// do not bounce a shared line between cores.
#[repr(align(64))]
#[derive(Debug, Default)]
struct ChunkLock(RwLock<()>);

/// A fixed-size RAM region with an allocation map; see the module documentation.
#[derive(Debug)]
pub struct RamDisk {
    size: u64,
    data: MmapRaw,
    /// One bit per page: set = the page may hold non-zero data (it is or was populated).
    alloc_map: MmapRaw,
    words: usize,
    locks: Box<[ChunkLock]>,
    allocated_pages: AtomicU64,
    /// Caps this disk's pages count against (its own, and the server-wide one).
    budgets: Vec<Arc<MemoryBudget>>,
    /// Pages are locked as they fault in.
    mlocked: bool,
}

/// A write needed pages that a memory cap does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("memory cap reached")]
pub struct NoSpace;

/// A cap on the pages held by the disks that share it.
#[derive(Debug)]
pub struct MemoryBudget {
    limit_pages: u64,
    used_pages: AtomicU64,
}

impl MemoryBudget {
    pub fn new(limit_bytes: u64) -> Self {
        Self {
            limit_pages: limit_bytes / PAGE_SIZE,
            used_pages: AtomicU64::new(0),
        }
    }

    pub fn limit_bytes(&self) -> u64 {
        self.limit_pages * PAGE_SIZE
    }

    pub fn used_bytes(&self) -> u64 {
        self.used_pages.load(Ordering::Relaxed) * PAGE_SIZE
    }

    fn try_reserve(&self, pages: u64) -> bool {
        self.used_pages
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(pages)
                    .filter(|&total| total <= self.limit_pages)
            })
            .is_ok()
    }

    fn force_reserve(&self, pages: u64) {
        self.used_pages.fetch_add(pages, Ordering::AcqRel);
    }

    fn release(&self, pages: u64) {
        self.used_pages.fetch_sub(pages, Ordering::AcqRel);
    }
}

/// How a disk's memory is managed.
#[derive(Debug, Clone, Default)]
pub struct MemoryOptions {
    /// Caps to count pages against; empty means unlimited.
    pub budgets: Vec<Arc<MemoryBudget>>,
    /// Lock pages in RAM as they are first written.
    pub mlock: bool,
    /// Advise transparent huge pages.
    pub hugepages: bool,
}

/// The state of a run of pages, as `base:allocation` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// Never written, trimmed or zeroed: reads as zero and costs no RAM.
    Hole,
    /// Holds data (possibly zeroes written with `NO_HOLE`).
    Data,
}

impl RamDisk {
    /// Reserves (but does not populate) `size` bytes of address space, with no memory policy.
    pub fn new(size: u64) -> io::Result<Self> {
        Self::with_options(size, &MemoryOptions::default())
    }

    /// Reserves `size` bytes of address space and applies the memory policy. Fails with a
    /// message naming RLIMIT_MEMLOCK when `mlock` is asked for beyond the locked-memory limit.
    pub fn with_options(size: u64, options: &MemoryOptions) -> io::Result<Self> {
        if size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "export size is zero",
            ));
        }
        let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "export size too large");
        let map_len = usize::try_from(size).map_err(|_| too_big())?;
        let words = usize::try_from(size.div_ceil(CHUNK_SIZE)).map_err(|_| too_big())?;
        let data = MmapRaw::from(
            MmapOptions::new()
                .len(map_len)
                .no_reserve_swap()
                .map_anon()?,
        );
        let alloc_map = MmapRaw::from(
            MmapOptions::new()
                .len(words * size_of::<AtomicU64>())
                .no_reserve_swap()
                .map_anon()?,
        );
        data.advise(Advice::DontDump)?;
        alloc_map.advise(Advice::DontDump)?;
        if options.hugepages {
            data.advise(Advice::HugePage).map_err(|err| {
                io::Error::new(
                    err.kind(),
                    format!("madvise(MADV_HUGEPAGE): {err}; is THP enabled?"),
                )
            })?;
        }
        if options.mlock {
            lock_on_fault(&data)?;
        }
        Ok(Self {
            size,
            data,
            alloc_map,
            words,
            locks: (0..LOCK_COUNT).map(|_| ChunkLock::default()).collect(),
            allocated_pages: AtomicU64::new(0),
            budgets: options.budgets.clone(),
            mlocked: options.mlock,
        })
    }

    /// The export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of pages the store holds data for (what the RAM disk really costs, give or take
    /// pages the kernel has not yet reclaimed).
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated_pages.load(Ordering::Relaxed) * PAGE_SIZE
    }

    /// Appends `len` bytes read at `offset` to `out`, without zero-filling `out` first.
    ///
    /// # Panics
    /// If the range is outside the export; callers validate requests first.
    pub fn read_into(&self, offset: u64, len: usize, out: &mut Vec<u8>) {
        self.check_range(offset, len as u64);
        out.reserve(len);
        let start = out.len();
        let spare = &mut out.spare_capacity_mut()[..len];
        let mut done = 0usize;
        for piece in Pieces::new(offset, len as u64) {
            let dst = &mut spare[done..done + piece.len as usize];
            let _guard = self.read_lock(piece.chunk);
            let word = self.word(piece.chunk).load(Ordering::Acquire);
            for page in piece.pages() {
                let dst_off = (page.offset - offset) as usize - done;
                let page_dst = &mut dst[dst_off..dst_off + page.len as usize];
                if word & page.bit == 0 {
                    page_dst.fill(std::mem::MaybeUninit::new(0));
                } else {
                    // SAFETY: `page` lies inside the mapping (check_range above and Pieces split
                    // the validated range). We hold the chunk's read lock, so no writer mutates
                    // these bytes during the copy; the destination is freshly reserved spare
                    // capacity that cannot overlap the mapping.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            self.data.as_ptr().add(page.offset as usize),
                            page_dst.as_mut_ptr().cast::<u8>(),
                            page.len as usize,
                        );
                    }
                }
            }
            done += piece.len as usize;
        }
        // SAFETY: every one of the `len` bytes after `start` was initialised above, by a fill or a
        // copy, and `reserve(len)` guaranteed the capacity.
        unsafe { out.set_len(start + len) };
    }

    /// Writes `data` at `offset`. Whole pages of zeroes are not populated (and are released if
    /// they held data), so writing zeroes costs no RAM.
    ///
    /// # Panics
    /// If the range is outside the export; callers validate requests first.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), NoSpace> {
        self.check_range(offset, data.len() as u64);
        let reserved = if self.budgets.is_empty() {
            0
        } else {
            self.pages_needed(offset, data)
        };
        self.reserve(reserved)?;
        let mut newly = 0u64;
        let mut done = 0usize;
        for piece in Pieces::new(offset, data.len() as u64) {
            let src = &data[done..done + piece.len as usize];
            let _guard = self.write_lock(piece.chunk);
            let word = self.word(piece.chunk);
            let mut set = 0u64;
            let mut release = PageRun::default();
            for page in piece.pages() {
                let at = (page.offset - offset) as usize - done;
                let page_src = &src[at..at + page.len as usize];
                let allocated = word.load(Ordering::Relaxed) & page.bit != 0;
                if is_zero(page_src) && (page.is_whole() || !allocated) {
                    // A whole page of zeroes, or zeroes into a page that already reads as
                    // zero: nothing to store.
                    if allocated {
                        release.add(page.offset);
                    } else {
                        self.flush_release(&mut release, word);
                    }
                    continue;
                }
                self.flush_release(&mut release, word);
                // SAFETY: in bounds (validated range); we hold the chunk's write lock, so no
                // other access to these bytes runs concurrently; `page_src` is a network buffer
                // that cannot overlap the mapping.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        page_src.as_ptr(),
                        self.data.as_mut_ptr().add(page.offset as usize),
                        page.len as usize,
                    );
                }
                // Zeroes over the last data of a held page leave nothing worth keeping.
                if allocated && is_zero(page_src) && self.release_if_zero(page.offset, word) {
                    continue;
                }
                set |= page.bit;
            }
            self.flush_release(&mut release, word);
            newly += self.mark_allocated(word, set);
            done += piece.len as usize;
        }
        self.settle(reserved, newly);
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeroes. With `release`, the page-aligned middle is
    /// given back to the kernel and becomes a hole; without it (`NO_HOLE`), zeroes are written
    /// and the pages stay allocated.
    ///
    /// # Panics
    /// If the range is outside the export; callers validate requests first.
    pub fn zero(&self, offset: u64, len: u64, release: bool) -> Result<(), NoSpace> {
        self.check_range(offset, len);
        // Only NO_HOLE zeroing allocates: every page in the range that is not yet held.
        let reserved = if release || self.budgets.is_empty() {
            0
        } else {
            Pieces::new(offset, len)
                .flat_map(Piece::pages)
                .filter(|page| !self.is_allocated(page.offset))
                .count() as u64
        };
        self.reserve(reserved)?;
        let mut newly = 0u64;
        for piece in Pieces::new(offset, len) {
            let _guard = self.write_lock(piece.chunk);
            let word = self.word(piece.chunk);
            let mut set = 0u64;
            let mut run = PageRun::default();
            for page in piece.pages() {
                let allocated = word.load(Ordering::Relaxed) & page.bit != 0;
                if release && page.is_whole() {
                    if allocated {
                        run.add(page.offset);
                    } else {
                        self.flush_release(&mut run, word);
                    }
                    continue;
                }
                self.flush_release(&mut run, word);
                if !allocated && release {
                    continue; // already reads as zero
                }
                // SAFETY: in bounds (validated range), and we hold the chunk's write lock.
                unsafe {
                    std::ptr::write_bytes(
                        self.data.as_mut_ptr().add(page.offset as usize),
                        0,
                        page.len as usize,
                    );
                }
                // A page whose data two unaligned TRIMs zeroed between them (the kernel splits
                // big discards at 4 GiB - 512) is all zero now: give it back too.
                if release && self.release_if_zero(page.offset, word) {
                    continue;
                }
                set |= page.bit;
            }
            self.flush_release(&mut run, word);
            newly += self.mark_allocated(word, set);
        }
        self.settle(reserved, newly);
        Ok(())
    }

    /// Walks the allocation map from `offset` for up to `len` bytes and returns runs of equal
    /// state, at most `max_extents` of them. Extents are page-aligned inside, clipped to the
    /// requested range at the ends. Lock-free: a result may lag a request still in flight, as
    /// the protocol allows.
    pub fn extents(&self, offset: u64, len: u64, max_extents: usize) -> Vec<(u64, Extent)> {
        self.check_range(offset, len);
        let end = offset + len;
        let mut out: Vec<(u64, Extent)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let chunk = pos / CHUNK_SIZE;
            let word = self.word(chunk).load(Ordering::Acquire);
            // Whole word in one state: jump over the rest of the chunk at once.
            let (state, next) = if word == 0 || word == u64::MAX {
                let state = if word == 0 {
                    Extent::Hole
                } else {
                    Extent::Data
                };
                (state, (chunk + 1) * CHUNK_SIZE)
            } else {
                let bit = 1u64 << ((pos % CHUNK_SIZE) / PAGE_SIZE);
                let state = if word & bit == 0 {
                    Extent::Hole
                } else {
                    Extent::Data
                };
                (state, (pos / PAGE_SIZE + 1) * PAGE_SIZE)
            };
            let step = next.min(end) - pos;
            let full = out.len() == max_extents;
            match out.last_mut() {
                Some((run, last)) if *last == state => *run += step,
                _ if full => break,
                _ => out.push((step, state)),
            }
            pos += step;
        }
        out
    }

    fn check_range(&self, offset: u64, len: u64) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.size),
            "range {offset}+{len} outside a {}-byte export",
            self.size
        );
    }

    fn read_lock(&self, chunk: u64) -> RwLockReadGuard<'_, ()> {
        // A poisoned lock only means another thread panicked while holding it; the data it
        // guards is plain bytes with no invariant to break, so carry on.
        let lock = &self.locks[chunk as usize % LOCK_COUNT].0;
        lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_lock(&self, chunk: u64) -> RwLockWriteGuard<'_, ()> {
        let lock = &self.locks[chunk as usize % LOCK_COUNT].0;
        lock.write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn word(&self, chunk: u64) -> &AtomicU64 {
        let index = chunk as usize;
        assert!(index < self.words);
        // SAFETY: `alloc_map` is a live, page-aligned (so 8-aligned) anonymous mapping of
        // `words` u64s, zero-initialised by the kernel (a valid AtomicU64), that lives as long as
        // `self`; `index < words` keeps the pointer in bounds. All access to it goes through
        // atomics, so shared references are sound.
        unsafe { &*self.alloc_map.as_ptr().cast::<AtomicU64>().add(index) }
    }

    /// Sets allocation bits; returns how many pages became newly allocated.
    fn mark_allocated(&self, word: &AtomicU64, bits: u64) -> u64 {
        if bits == 0 {
            return 0;
        }
        let before = word.fetch_or(bits, Ordering::Release);
        let new = u64::from((bits & !before).count_ones());
        self.allocated_pages.fetch_add(new, Ordering::Relaxed);
        new
    }

    fn is_allocated(&self, page_offset: u64) -> bool {
        let bit = 1u64 << ((page_offset % CHUNK_SIZE) / PAGE_SIZE);
        self.word(page_offset / CHUNK_SIZE).load(Ordering::Acquire) & bit != 0
    }

    /// Pages a write would newly populate: those holding non-zero data that are not allocated
    /// yet. Read without locks, so concurrent requests can make it inexact; `settle` squares
    /// the budgets with what really happened.
    fn pages_needed(&self, offset: u64, data: &[u8]) -> u64 {
        let mut needed = 0;
        for page in Pieces::new(offset, data.len() as u64).flat_map(Piece::pages) {
            let at = (page.offset - offset) as usize;
            if !self.is_allocated(page.offset) && !is_zero(&data[at..at + page.len as usize]) {
                needed += 1;
            }
        }
        needed
    }

    /// Takes `pages` from every budget, or from none.
    fn reserve(&self, pages: u64) -> Result<(), NoSpace> {
        if pages == 0 {
            return Ok(());
        }
        for (i, budget) in self.budgets.iter().enumerate() {
            if !budget.try_reserve(pages) {
                self.budgets[..i].iter().for_each(|b| b.release(pages));
                return Err(NoSpace);
            }
        }
        Ok(())
    }

    /// After an operation that reserved `reserved` pages allocated `allocated`: return the
    /// surplus, or account pages a concurrent trim freed between the estimate and the write
    /// (a transient overshoot of at most that race, rather than failing a write half-done).
    fn settle(&self, reserved: u64, allocated: u64) {
        for budget in &self.budgets {
            if allocated < reserved {
                budget.release(reserved - allocated);
            } else if allocated > reserved {
                budget.force_reserve(allocated - reserved);
            }
        }
    }

    /// `madvise(MADV_DONTNEED)` on a page-aligned range; the caller holds its chunk's write
    /// lock. Locked (`mlock`) pages refuse DONTNEED, so they are unlocked for the call and the
    /// range is locked again on-fault, which re-merges the mapping into one VMA.
    fn discard_pages(&self, start: u64, len: u64) -> io::Result<()> {
        let ptr = self
            .data
            .as_ptr()
            .wrapping_add(start as usize)
            .cast::<libc::c_void>();
        if self.mlocked {
            // SAFETY: a page-aligned range of our live mapping; munlock only changes its
            // locking attribute.
            if unsafe { libc::munlock(ptr, len as usize) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: the range is page-aligned and inside the mapping, and the caller holds the
        // write lock of its chunk, so no reader or writer is copying these bytes and no
        // reference into them exists (this module never keeps one). For a private anonymous
        // mapping, DONTNEED drops the pages and later reads see zero-fill-on-demand pages,
        // which is the result we want.
        let result = unsafe {
            self.data.unchecked_advise_range(
                UncheckedAdvice::DontNeed,
                start as usize,
                len as usize,
            )
        };
        if self.mlocked {
            // SAFETY: as for munlock above; MLOCK_ONFAULT populates nothing.
            if unsafe { libc::mlock2(ptr, len as usize, libc::MLOCK_ONFAULT) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        result
    }

    /// Releases the page holding `offset` if it now reads all zero. The caller holds the write
    /// lock of its chunk. Returns whether it did.
    fn release_if_zero(&self, offset: u64, word: &AtomicU64) -> bool {
        let start = offset / PAGE_SIZE * PAGE_SIZE;
        // SAFETY: the whole page lies inside the mapping (mappings are page-granular, so even
        // the last, partial page of an odd-sized export is mapped), and we hold the write lock
        // of its chunk: nothing else reads or writes these bytes while the slice lives, and it
        // does not outlive this statement.
        let page = unsafe {
            std::slice::from_raw_parts(self.data.as_ptr().add(start as usize), PAGE_SIZE as usize)
        };
        if !is_zero(page) {
            return false;
        }
        let mut run = PageRun::default();
        run.add(start);
        self.flush_release(&mut run, word);
        true
    }

    /// Gives a run of whole pages back to the kernel and clears their bits. The caller holds
    /// the write lock of the chunk the run lies in (runs never cross a chunk).
    fn flush_release(&self, run: &mut PageRun, word: &AtomicU64) {
        let Some((start, len)) = run.take() else {
            return;
        };
        let result = self.discard_pages(start, len);
        if let Err(err) = result {
            // Not expected for a valid range of our own mapping; if it ever happens, the data
            // must still read back as zero, so fall back to writing zeroes and keep the pages.
            tracing::warn!(%err, "madvise(DONTNEED) failed, zero-filling instead");
            // SAFETY: same range and lock as above.
            unsafe {
                std::ptr::write_bytes(self.data.as_mut_ptr().add(start as usize), 0, len as usize)
            };
            return;
        }
        let first = (start % CHUNK_SIZE) / PAGE_SIZE;
        let count = len / PAGE_SIZE;
        let bits = if count == PAGES_PER_WORD {
            u64::MAX
        } else {
            ((1u64 << count) - 1) << first
        };
        let before = word.fetch_and(!bits, Ordering::Release);
        let freed = u64::from((before & bits).count_ones());
        self.allocated_pages.fetch_sub(freed, Ordering::Relaxed);
        self.budgets.iter().for_each(|budget| budget.release(freed));
    }

    /// Bytes of the data region the kernel really holds in RAM (`mincore`), looked up only
    /// around pages the allocation map knows of, in 2 MiB windows so that transparent huge
    /// pages are counted whole. Costs in proportion to the data held, not the export size.
    pub fn resident_bytes(&self) -> u64 {
        const WINDOW: u64 = 2 << 20;
        let words_per_window = (WINDOW / CHUNK_SIZE) as usize;
        let mut pages = vec![0u8; (WINDOW / PAGE_SIZE) as usize];
        let mut resident = 0u64;
        for first_word in (0..self.words).step_by(words_per_window) {
            let last_word = (first_word + words_per_window).min(self.words);
            if (first_word..last_word).all(|w| self.word(w as u64).load(Ordering::Relaxed) == 0) {
                continue;
            }
            let start = first_word as u64 * CHUNK_SIZE;
            let len = WINDOW.min(self.size - start);
            let count = len.div_ceil(PAGE_SIZE) as usize;
            // SAFETY: `start` is page-aligned and `[start, start + len)` lies inside our live
            // mapping; `pages` has room for one status byte per page of that range. mincore
            // only reads page tables: it touches no data another thread may be writing.
            let rc = unsafe {
                libc::mincore(
                    self.data
                        .as_ptr()
                        .wrapping_add(start as usize)
                        .cast_mut()
                        .cast(),
                    len as usize,
                    pages.as_mut_ptr(),
                )
            };
            if rc == 0 {
                resident += pages[..count].iter().filter(|&&p| p & 1 != 0).count() as u64;
            }
        }
        resident * PAGE_SIZE
    }
}

/// Locks the mapping's pages as they fault in, so written data is never swapped out.
fn lock_on_fault(data: &MmapRaw) -> io::Result<()> {
    // SAFETY: the pointer and length describe exactly one live mapping we own. mlock2 changes
    // only the mapping's locking attribute; no memory is read or written.
    let rc = unsafe { libc::mlock2(data.as_ptr().cast(), data.len(), libc::MLOCK_ONFAULT) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we pass.
    let limit = match unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } {
        0 if limit.rlim_cur == libc::RLIM_INFINITY => "unlimited".to_owned(),
        0 => format!("{} bytes", limit.rlim_cur),
        _ => "unknown".to_owned(),
    };
    Err(io::Error::new(
        err.kind(),
        format!(
            "mlock of {} bytes failed ({err}): RLIMIT_MEMLOCK is {limit}; raise it to at least \
             the export size (systemd: LimitMEMLOCK=infinity; shell: ulimit -l unlimited), or \
             grant CAP_IPC_LOCK, or drop --mlock",
            data.len()
        ),
    ))
}

/// From `<linux/prctl.h>` (Linux 5.6); the libc crate does not export it.
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// Marks this process as an I/O flusher (`PR_SET_IO_FLUSHER`): its memory allocations never
/// wait on I/O, and it is not throttled by dirty-page writeback. Why: when the kernel's NBD
/// client for this server runs on the same host, reclaim may need to write dirty pages *to our
/// device*; if serving that write needed reclaim that waits on our device's writeback, the
/// two would wait on each other forever. Threads created afterwards inherit the flag, so call
/// this before starting the runtime. Needs CAP_SYS_RESOURCE.
pub fn set_io_flusher() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_IO_FLUSHER takes integer arguments only and touches no memory.
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes the C allocator serve buffers of 128 KiB and more from their own mappings, which go
/// back to the kernel the moment they are freed. A connection's receive and send buffers are
/// the server's only large heap allocations; with glibc's default adaptive threshold they end
/// up in per-thread arenas that keep the memory after the connection closes (`malloc_trim`
/// does not shrink those below the trim threshold either), so an idle RAM disk would hold
/// megabytes it does not use. Call before other threads start. (The send buffer's alignment
/// pad in `session::transmit` keeps page-aligned buffers from slowing the copies.)
pub fn return_large_buffers_to_kernel() {
    // SAFETY: mallopt only changes allocator tuning and is called before any other thread
    // exists, so no allocation races with it.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) };
}

/// Fast all-zero test: OR-folding fixed blocks vectorises well, and random data exits at the
/// first block.
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(64);
    let whole = blocks
        .by_ref()
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0);
    whole && blocks.remainder().iter().all(|&b| b == 0)
}

/// A contiguous run of whole pages collected for one `madvise` call.
#[derive(Debug, Default)]
struct PageRun {
    start: u64,
    len: u64,
}

impl PageRun {
    fn add(&mut self, page_offset: u64) {
        if self.len > 0 && self.start + self.len == page_offset {
            self.len += PAGE_SIZE;
        } else {
            debug_assert!(self.len == 0, "runs are flushed before a gap");
            self.start = page_offset;
            self.len = PAGE_SIZE;
        }
    }

    fn take(&mut self) -> Option<(u64, u64)> {
        (self.len > 0).then(|| (self.start, std::mem::take(&mut self.len)))
    }
}

/// The part of a request inside one chunk.
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
    fn is_whole(&self) -> bool {
        self.len == PAGE_SIZE
    }
}

impl Piece {
    fn pages(self) -> impl Iterator<Item = PagePart> {
        split(self.offset, self.len, PAGE_SIZE).map(|(offset, len)| PagePart {
            offset,
            len,
            bit: 1 << ((offset % CHUNK_SIZE) / PAGE_SIZE),
        })
    }
}

/// Splits a range into chunk pieces.
struct Pieces;

impl Pieces {
    #[allow(clippy::new_ret_no_self)]
    fn new(offset: u64, len: u64) -> impl Iterator<Item = Piece> {
        split(offset, len, CHUNK_SIZE).map(|(offset, len)| Piece {
            chunk: offset / CHUNK_SIZE,
            offset,
            len,
        })
    }
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
mod tests {
    use super::*;

    fn read(disk: &RamDisk, offset: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        disk.read_into(offset, len, &mut out);
        out
    }

    #[test]
    fn fresh_disk_reads_zero_and_is_one_hole() {
        let disk = RamDisk::new(10 * CHUNK_SIZE + 123).unwrap();
        assert!(read(&disk, 0, 100_000).iter().all(|&b| b == 0));
        assert_eq!(
            disk.extents(0, disk.size(), 16),
            vec![(disk.size(), Extent::Hole)]
        );
        assert_eq!(disk.allocated_bytes(), 0);
    }

    #[test]
    fn unaligned_write_reads_back_across_chunks() {
        let disk = RamDisk::new(4 * CHUNK_SIZE).unwrap();
        let data: Vec<u8> = (0..CHUNK_SIZE + 9000)
            .map(|i| (i % 251) as u8 + 1)
            .collect();
        let at = CHUNK_SIZE - 777;
        disk.write(at, &data).unwrap();
        assert_eq!(read(&disk, at, data.len()), data);
        assert_eq!(read(&disk, at - 10, 10), vec![0; 10]);
        // Pages touched: from the page holding `at` to the one holding the last byte.
        let first = at / PAGE_SIZE;
        let last = (at + data.len() as u64 - 1) / PAGE_SIZE;
        assert_eq!(disk.allocated_bytes(), (last - first + 1) * PAGE_SIZE);
    }

    #[test]
    fn zero_pages_in_a_write_are_not_allocated() {
        let disk = RamDisk::new(CHUNK_SIZE).unwrap();
        let mut data = vec![0u8; 4 * PAGE_SIZE as usize];
        data[PAGE_SIZE as usize + 5] = 7; // only page 1 holds data
        disk.write(0, &data).unwrap();
        assert_eq!(disk.allocated_bytes(), PAGE_SIZE);
        assert_eq!(read(&disk, 0, data.len()), data);
        assert_eq!(
            disk.extents(0, 4 * PAGE_SIZE, 16),
            vec![
                (PAGE_SIZE, Extent::Hole),
                (PAGE_SIZE, Extent::Data),
                (2 * PAGE_SIZE, Extent::Hole)
            ]
        );
        // Overwriting the data page with zeroes releases it.
        disk.write(PAGE_SIZE, &vec![0; PAGE_SIZE as usize]).unwrap();
        assert_eq!(disk.allocated_bytes(), 0);
        assert!(read(&disk, 0, data.len()).iter().all(|&b| b == 0));
    }

    #[test]
    fn zero_with_release_frees_whole_pages_and_zeroes_edges() {
        let disk = RamDisk::new(3 * CHUNK_SIZE).unwrap();
        let data = vec![0xabu8; (2 * CHUNK_SIZE) as usize];
        disk.write(0, &data).unwrap();
        assert_eq!(disk.allocated_bytes(), 2 * CHUNK_SIZE);
        disk.zero(100, 2 * CHUNK_SIZE - 200, true).unwrap();
        let back = read(&disk, 0, data.len());
        assert!(back[..100].iter().all(|&b| b == 0xab));
        assert!(back[100..back.len() - 100].iter().all(|&b| b == 0));
        assert!(back[back.len() - 100..].iter().all(|&b| b == 0xab));
        // Only the two edge pages keep RAM.
        assert_eq!(disk.allocated_bytes(), 2 * PAGE_SIZE);
    }

    #[test]
    fn unaligned_trims_that_zero_a_page_between_them_release_it() {
        let disk = RamDisk::new(2 * CHUNK_SIZE).unwrap();
        disk.write(PAGE_SIZE, &[5; PAGE_SIZE as usize]).unwrap();
        disk.zero(0, PAGE_SIZE + 512, true).unwrap();
        assert_eq!(
            disk.allocated_bytes(),
            PAGE_SIZE,
            "half the page still holds data"
        );
        disk.zero(PAGE_SIZE + 512, CHUNK_SIZE, true).unwrap();
        assert_eq!(disk.allocated_bytes(), 0);
        // The same through writes of zeroes.
        disk.write(PAGE_SIZE, &[5; PAGE_SIZE as usize]).unwrap();
        disk.write(PAGE_SIZE, &[0; 100]).unwrap();
        disk.write(PAGE_SIZE + 100, &[0; PAGE_SIZE as usize - 100])
            .unwrap();
        assert_eq!(disk.allocated_bytes(), 0);
    }

    #[test]
    fn zero_without_release_keeps_pages_allocated() {
        let disk = RamDisk::new(CHUNK_SIZE).unwrap();
        disk.zero(0, 2 * PAGE_SIZE, false).unwrap();
        assert_eq!(disk.allocated_bytes(), 2 * PAGE_SIZE);
        assert_eq!(
            disk.extents(0, 2 * PAGE_SIZE, 4),
            vec![(2 * PAGE_SIZE, Extent::Data)]
        );
        assert!(
            read(&disk, 0, 2 * PAGE_SIZE as usize)
                .iter()
                .all(|&b| b == 0)
        );
    }

    #[test]
    fn extents_respect_the_limit_and_range() {
        let disk = RamDisk::new(CHUNK_SIZE).unwrap();
        for page in (0..64).step_by(2) {
            disk.write(page * PAGE_SIZE, &[1]).unwrap();
        }
        let all = disk.extents(0, CHUNK_SIZE, usize::MAX);
        assert_eq!(all.len(), 64);
        assert_eq!(disk.extents(0, CHUNK_SIZE, 3).len(), 3);
        assert_eq!(disk.extents(10, 100, 8), vec![(100, Extent::Data)]);
    }

    #[test]
    fn a_one_extent_limit_still_covers_the_whole_first_run() {
        let disk = RamDisk::new(4 * CHUNK_SIZE).unwrap();
        disk.write(0, &[1; 3 * PAGE_SIZE as usize]).unwrap();
        assert_eq!(
            disk.extents(0, disk.size(), 1),
            vec![(3 * PAGE_SIZE, Extent::Data)]
        );
        let rest = disk.size() - 3 * PAGE_SIZE;
        assert_eq!(
            disk.extents(3 * PAGE_SIZE, rest, 1),
            vec![(rest, Extent::Hole)]
        );
    }

    #[test]
    fn huge_sparse_disk_costs_nothing() {
        let disk = RamDisk::new(1 << 40).unwrap();
        disk.write((1 << 40) - 4096, &[9; 4096]).unwrap();
        disk.zero(0, (1 << 40) - 4096, true).unwrap();
        assert_eq!(disk.allocated_bytes(), PAGE_SIZE);
        let extents = disk.extents(0, 1 << 40, 16);
        assert_eq!(
            extents,
            vec![((1 << 40) - 4096, Extent::Hole), (4096, Extent::Data)]
        );
    }

    #[test]
    fn resident_bytes_follow_writes_and_trims() {
        let disk = RamDisk::new(64 << 20).unwrap();
        assert_eq!(disk.resident_bytes(), 0);
        disk.write(5 << 20, &[3; 3 * PAGE_SIZE as usize]).unwrap();
        assert_eq!(disk.resident_bytes(), 3 * PAGE_SIZE);
        disk.zero(5 << 20, PAGE_SIZE, true).unwrap();
        assert_eq!(disk.resident_bytes(), 2 * PAGE_SIZE);
    }

    #[test]
    fn is_zero_checks_every_byte() {
        let mut buf = vec![0u8; 4099];
        assert!(is_zero(&buf));
        for at in [0, 63, 64, 4095, 4098] {
            buf[at] = 1;
            assert!(!is_zero(&buf), "missed byte {at}");
            buf[at] = 0;
        }
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    fn capped(size: u64, cap: u64) -> (RamDisk, Arc<MemoryBudget>) {
        let budget = Arc::new(MemoryBudget::new(cap));
        let options = MemoryOptions {
            budgets: vec![Arc::clone(&budget)],
            ..Default::default()
        };
        (RamDisk::with_options(size, &options).unwrap(), budget)
    }

    #[test]
    fn writes_fail_at_the_cap_and_trim_makes_room() {
        let (disk, budget) = capped(4 * CHUNK_SIZE, 8 * PAGE_SIZE);
        disk.write(0, &[7; 8 * PAGE_SIZE as usize]).unwrap();
        assert_eq!(budget.used_bytes(), 8 * PAGE_SIZE);
        // Over the cap: refused, and nothing was written.
        assert_eq!(disk.write(CHUNK_SIZE, &[1; 10]), Err(NoSpace));
        let mut back = Vec::new();
        disk.read_into(CHUNK_SIZE, 10, &mut back);
        assert_eq!(back, vec![0; 10]);
        // Overwriting held pages and writing zeroes need no room.
        disk.write(0, &[9; 100]).unwrap();
        disk.write(CHUNK_SIZE, &[0; PAGE_SIZE as usize]).unwrap();
        // Trim two pages: two pages of room.
        disk.zero(0, 2 * PAGE_SIZE, true).unwrap();
        assert_eq!(budget.used_bytes(), 6 * PAGE_SIZE);
        disk.write(CHUNK_SIZE, &[1; 2 * PAGE_SIZE as usize])
            .unwrap();
        assert_eq!(disk.write(2 * CHUNK_SIZE, &[1]), Err(NoSpace));
        // NO_HOLE zeroing allocates, so it is capped too.
        assert_eq!(disk.zero(3 * CHUNK_SIZE, PAGE_SIZE, false), Err(NoSpace));
    }

    #[test]
    fn a_shared_budget_caps_several_disks() {
        let budget = Arc::new(MemoryBudget::new(4 * PAGE_SIZE));
        let options = MemoryOptions {
            budgets: vec![Arc::clone(&budget)],
            ..Default::default()
        };
        let a = RamDisk::with_options(CHUNK_SIZE, &options).unwrap();
        let b = RamDisk::with_options(CHUNK_SIZE, &options).unwrap();
        a.write(0, &[1; 3 * PAGE_SIZE as usize]).unwrap();
        assert_eq!(b.write(0, &[1; 2 * PAGE_SIZE as usize]), Err(NoSpace));
        b.write(0, &[1; PAGE_SIZE as usize]).unwrap();
        a.zero(0, CHUNK_SIZE, true).unwrap();
        b.write(PAGE_SIZE, &[1; 3 * PAGE_SIZE as usize]).unwrap();
        assert_eq!(budget.used_bytes(), 4 * PAGE_SIZE);
    }
}
