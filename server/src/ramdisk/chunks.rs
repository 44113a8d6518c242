//! Chunk locks and their guards: the only way to touch an export's bytes.
//!
//! The export is cut into [`CHUNK_SIZE`] chunks. Every chunk is guarded by one of
//! [`LOCK_COUNT`] cache-padded `RwLock`s (chunk index modulo the lock count, so a 1 TiB export
//! costs no more lock memory than a small one). Copying out of a chunk is a method of its
//! [`ReadGuard`]; copying in, zero-filling, checking for zeroes, giving pages back, populating
//! pages ahead of a copy and setting allocation bits are methods of its [`WriteGuard`]. So "the lock is held" is a fact the
//! compiler checks, not a comment: no function here can reach the bytes without a guard, and
//! every guard method checks that its range lies inside the guarded chunk (and inside the
//! export), so no argument a caller passes can make an access unsound — a wrong one panics.
//!
//! Rules for users of this module: hold one guard at a time (two chunks may share a lock), and
//! never across an `.await` (the API is synchronous, and clippy's `await_holding_lock` is denied).

use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::alloc_map::AllocationMap;
use super::backing::Backing;
use super::{CHUNK_SIZE, PAGE_SIZE, os};

/// Number of chunk locks, whatever the export size.
const LOCK_COUNT: usize = 1024;

/// Set once `MADV_POPULATE_WRITE` has failed with `EINVAL` (a kernel older than 5.14): from
/// then on pages are faulted in one at a time by the copies, without asking again.
static POPULATE_UNSUPPORTED: AtomicBool = AtomicBool::new(false);
/// Set once a failed populate has been logged, so a failing call costs no log line per write.
static POPULATE_FAILURE_LOGGED: AtomicBool = AtomicBool::new(false);

/// One chunk lock on its own cache line, so that neighbouring locks taken by different threads
/// do not bounce a shared line between cores.
#[repr(align(64))]
#[derive(Debug, Default)]
struct ChunkLock(RwLock<()>);

/// An export's bytes, its allocation map and the locks that order access to both.
#[derive(Debug)]
pub(super) struct Chunks {
    /// The export's size: no guard reaches a byte at or past it.
    size: u64,
    backing: Box<dyn Backing>,
    map: AllocationMap,
    locks: Box<[ChunkLock]>,
}

impl Chunks {
    pub(super) fn new(size: u64, backing: Box<dyn Backing>, map: AllocationMap) -> Self {
        assert!(
            backing.map().len() as u64 >= size,
            "the backing is smaller than the export"
        );
        assert_eq!(map.words() as u64, size.div_ceil(CHUNK_SIZE));
        Self {
            size,
            backing,
            map,
            locks: (0..LOCK_COUNT).map(|_| ChunkLock::default()).collect(),
        }
    }

    pub(super) fn backing(&self) -> &dyn Backing {
        &*self.backing
    }

    pub(super) fn map(&self) -> &AllocationMap {
        &self.map
    }

    /// The bytes of `chunk` that belong to the export.
    fn span(&self, chunk: u64) -> Range<u64> {
        let start = chunk * CHUNK_SIZE;
        assert!(start < self.size, "chunk {chunk} is past the export's end");
        start..(start + CHUNK_SIZE).min(self.size)
    }

    fn lock(&self, chunk: u64) -> &RwLock<()> {
        &self.locks[(chunk % LOCK_COUNT as u64) as usize].0
    }

    pub(super) fn read(&self, chunk: u64) -> ReadGuard<'_> {
        let span = self.span(chunk);
        // A poisoned lock only means another thread panicked while holding it; the data it
        // guards is plain bytes with no invariant to break, so carry on.
        let lock = self.lock(chunk).read().unwrap_or_else(|p| p.into_inner());
        ReadGuard {
            _lock: lock,
            chunks: self,
            word: self.map.word(chunk),
            span,
        }
    }

    pub(super) fn write(&self, chunk: u64) -> WriteGuard<'_> {
        let span = self.span(chunk);
        let lock = self.lock(chunk).write().unwrap_or_else(|p| p.into_inner());
        WriteGuard {
            _lock: lock,
            chunks: self,
            word: self.map.word(chunk),
            span,
        }
    }
}

/// Panics unless `range` lies inside `span`.
fn check_inside(range: &Range<u64>, span: &Range<u64>) {
    assert!(
        span.start <= range.start && range.start <= range.end && range.end <= span.end,
        "range {range:?} is outside the guarded chunk {span:?}"
    );
}

/// The result of a `send` or `recv`: the bytes it moved, or the error `errno` names.
fn byte_count(returned: isize) -> io::Result<usize> {
    usize::try_from(returned).map_err(|_| io::Error::last_os_error())
}

/// Shared access to one chunk: its bytes can be copied out.
#[derive(Debug)]
pub(super) struct ReadGuard<'a> {
    _lock: RwLockReadGuard<'a, ()>,
    chunks: &'a Chunks,
    word: &'a AtomicU64,
    span: Range<u64>,
}

impl ReadGuard<'_> {
    /// The chunk's allocation bits (bit n: page n of the chunk may hold data).
    pub(super) fn allocated(&self) -> u64 {
        self.word.load(Ordering::Acquire)
    }

    /// Copies `dst.len()` bytes starting at export offset `offset` into `dst`.
    pub(super) fn copy_out(&self, offset: u64, dst: &mut [u8]) {
        check_inside(&(offset..offset + dst.len() as u64), &self.span);
        // SAFETY: the range lies inside the guarded chunk, which lies inside the export and so
        // inside the mapping. We hold the chunk's read lock, so no writer changes these bytes
        // during the copy; `dst` is a `&mut` the caller owns, so it cannot overlap the mapping
        // (this module never hands out references into it).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.chunks.backing.map().as_ptr().add(offset as usize),
                dst.as_mut_ptr(),
                dst.len(),
            );
        }
    }
}

impl ReadGuard<'_> {
    /// Sends at most `len` bytes from export offset `offset` to the stream socket `socket`,
    /// without waiting (`send` with `MSG_DONTWAIT`, and `MSG_NOSIGNAL`: a peer gone away is an
    /// error, not a signal): READ data leaves the store with one copy, the kernel's. Returns
    /// how many bytes the socket took, or `WouldBlock` when it has no room.
    pub(super) fn send(
        &self,
        offset: u64,
        len: usize,
        socket: BorrowedFd<'_>,
    ) -> io::Result<usize> {
        check_inside(&(offset..offset + len as u64), &self.span);
        // SAFETY: the range lies inside the guarded chunk, so inside the mapping, and we hold
        // the chunk's read lock: no writer changes these bytes while the kernel copies them
        // (send copies before it returns; no MSG_ZEROCOPY). The kernel only reads the range.
        // A descriptor that is not a socket makes send fail and read nothing.
        let sent = unsafe {
            libc::send(
                socket.as_raw_fd(),
                self.chunks
                    .backing
                    .map()
                    .as_ptr()
                    .add(offset as usize)
                    .cast(),
                len,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        byte_count(sent)
    }
}

/// Exclusive access to one chunk: its bytes and allocation bits can change.
#[derive(Debug)]
pub(super) struct WriteGuard<'a> {
    _lock: RwLockWriteGuard<'a, ()>,
    chunks: &'a Chunks,
    word: &'a AtomicU64,
    span: Range<u64>,
}

impl WriteGuard<'_> {
    pub(super) fn allocated(&self) -> u64 {
        self.word.load(Ordering::Acquire)
    }

    /// The bytes of the page starting at `page` that belong to the export (the last page of an
    /// export whose size is not a page multiple is cut short).
    pub(super) fn page_span(&self, page: u64) -> Range<u64> {
        assert_eq!(page % PAGE_SIZE, 0, "not a page start");
        let span = page..(page + PAGE_SIZE).min(self.span.end);
        check_inside(&span, &self.span);
        span
    }

    /// Copies `src` to export offset `offset`.
    pub(super) fn copy_in(&mut self, offset: u64, src: &[u8]) {
        check_inside(&(offset..offset + src.len() as u64), &self.span);
        // SAFETY: inside the guarded chunk, so inside the mapping; we hold the chunk's write
        // lock, so nothing else reads or writes these bytes meanwhile; `src` is a shared
        // reference the caller owns, so it cannot overlap the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                self.chunks.backing.map().as_mut_ptr().add(offset as usize),
                src.len(),
            );
        }
    }

    /// Receives at most `len` bytes from the stream socket `socket` straight into export
    /// offset `offset`, without waiting (`recv` with `MSG_DONTWAIT`): the payload of a WRITE
    /// lands in the store with one copy, the kernel's. Returns how many bytes arrived (0: the
    /// peer closed the stream), or `WouldBlock` when none are waiting. The caller marks the
    /// pages allocated before the guard goes (bytes may now be non-zero).
    pub(super) fn receive(
        &mut self,
        offset: u64,
        len: usize,
        socket: BorrowedFd<'_>,
    ) -> io::Result<usize> {
        check_inside(&(offset..offset + len as u64), &self.span);
        // SAFETY: the range lies inside the guarded chunk, so inside the mapping, and we hold
        // the chunk's write lock: nothing else reads or writes these bytes during the call, and
        // no reference into them exists. The kernel writes at most `len` bytes there. A socket
        // that is not one (or a bad descriptor) makes recv fail with ENOTSOCK / EBADF and write
        // nothing; MSG_DONTWAIT keeps the call from blocking while the lock is held.
        let received = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                self.chunks
                    .backing
                    .map()
                    .as_mut_ptr()
                    .add(offset as usize)
                    .cast(),
                len,
                libc::MSG_DONTWAIT,
            )
        };
        byte_count(received)
    }

    /// Writes zeroes over `range`.
    pub(super) fn fill_zero(&mut self, range: Range<u64>) {
        check_inside(&range, &self.span);
        // SAFETY: inside the guarded chunk and the mapping; exclusive under the write lock.
        unsafe {
            std::ptr::write_bytes(
                self.chunks
                    .backing
                    .map()
                    .as_mut_ptr()
                    .add(range.start as usize),
                0,
                (range.end - range.start) as usize,
            );
        }
    }

    /// Whether every byte of `range` is zero.
    pub(super) fn is_zero(&self, range: Range<u64>) -> bool {
        check_inside(&range, &self.span);
        // SAFETY: inside the guarded chunk and the mapping. We hold the write lock, so nothing
        // writes these bytes while the slice lives, and it does not outlive this statement.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                self.chunks.backing.map().as_ptr().add(range.start as usize),
                (range.end - range.start) as usize,
            )
        };
        super::is_zero(bytes)
    }

    /// Gives the whole pages of `pages` back to the system and clears their allocation bits;
    /// they read as zero afterwards. Returns how many held pages were freed. If the system
    /// refuses (not expected for our own mapping), the pages are zero-filled instead and stay
    /// allocated, so they still read as zero.
    pub(super) fn discard(&mut self, pages: Range<u64>) -> u64 {
        check_inside(&pages, &self.span);
        assert!(
            pages.start.is_multiple_of(PAGE_SIZE)
                && (pages.end.is_multiple_of(PAGE_SIZE) || pages.end == self.span.end),
            "{pages:?} is not a run of whole pages"
        );
        // The last page of an odd-sized export is discarded whole: the mapping covers it.
        let mapped = pages.start as usize..(pages.end.div_ceil(PAGE_SIZE) * PAGE_SIZE) as usize;
        // SAFETY: the pages lie inside the guarded chunk's part of the mapping (checked above;
        // its bytes past the export's end are never read or written), and we hold the chunk's
        // write lock, so nothing else accesses them and no reference into them exists.
        if let Err(err) = unsafe { self.chunks.backing.discard(mapped) } {
            tracing::warn!(%err, "giving pages back failed, zero-filling instead");
            self.fill_zero(pages);
            return 0;
        }
        let first = (pages.start % CHUNK_SIZE) / PAGE_SIZE;
        let count = pages.end.div_ceil(PAGE_SIZE) - pages.start / PAGE_SIZE;
        let bits = if count == 64 {
            u64::MAX
        } else {
            ((1u64 << count) - 1) << first
        };
        self.chunks.map.clear(self.word, bits)
    }

    /// Faults in the whole pages of `pages` writable ahead of copies into them
    /// (`MADV_POPULATE_WRITE`): one system call for the run instead of one page fault per page.
    /// Changes no data and no allocation bit; the caller populates only pages it is about to
    /// store into, so a page gets RAM exactly when it would have by being written. If the
    /// system refuses (a kernel before 5.14, or no memory to populate with), nothing is lost:
    /// the copies fault the pages in as before. Returns whether the run was populated.
    pub(super) fn populate(&mut self, pages: Range<u64>) -> bool {
        check_inside(&pages, &self.span);
        assert!(
            pages.start.is_multiple_of(PAGE_SIZE)
                && (pages.end.is_multiple_of(PAGE_SIZE) || pages.end == self.span.end),
            "{pages:?} is not a run of whole pages"
        );
        if POPULATE_UNSUPPORTED.load(Ordering::Relaxed) {
            return false;
        }
        // The last page of an odd-sized export is populated whole: the mapping covers it.
        let mapped = pages.start as usize..(pages.end.div_ceil(PAGE_SIZE) * PAGE_SIZE) as usize;
        match os::populate_write(self.chunks.backing.map(), mapped) {
            Ok(()) => true,
            Err(err) => {
                if err.raw_os_error() == Some(libc::EINVAL) {
                    POPULATE_UNSUPPORTED.store(true, Ordering::Relaxed);
                }
                if !POPULATE_FAILURE_LOGGED.swap(true, Ordering::Relaxed) {
                    tracing::debug!(
                        %err,
                        "MADV_POPULATE_WRITE failed; pages are faulted in one at a time instead"
                    );
                }
                false
            }
        }
    }

    /// Sets allocation bits; returns how many pages became newly allocated.
    pub(super) fn mark_allocated(&mut self, bits: u64) -> u64 {
        self.chunks.map.set(self.word, bits)
    }
}

impl Chunks {
    /// Takes every chunk lock shared, in index order: no write can be in progress or start
    /// anywhere in the export until the result is dropped, while reads go on. For the final
    /// pass of a snapshot (`dirty`). Deadlock-free although it holds many locks: every other
    /// user holds one lock at a time and waits for no other while holding it, so whoever
    /// holds a lock this waits for will release it.
    pub(super) fn freeze(&self) -> Frozen<'_> {
        let locks = self
            .locks
            .iter()
            .map(|lock| lock.0.read().unwrap_or_else(|p| p.into_inner()))
            .collect();
        Frozen {
            _locks: locks,
            chunks: self,
        }
    }
}

/// Shared access to every chunk at once: see [`Chunks::freeze`].
#[derive(Debug)]
pub(super) struct Frozen<'a> {
    _locks: Vec<RwLockReadGuard<'a, ()>>,
    chunks: &'a Chunks,
}

impl Frozen<'_> {
    /// `chunk`'s allocation bits.
    pub(super) fn allocated(&self, chunk: u64) -> u64 {
        self.chunks.map.bits(chunk)
    }

    /// Copies `dst.len()` bytes at export offset `offset`, which must lie inside one chunk.
    pub(super) fn copy_out(&self, offset: u64, dst: &mut [u8]) {
        let span = self.chunks.span(offset / CHUNK_SIZE);
        check_inside(&(offset..offset + dst.len() as u64), &span);
        // SAFETY: the range lies inside one chunk, inside the export and so inside the
        // mapping. We hold every chunk's read lock, this one's among them, so no writer
        // changes these bytes during the copy; `dst` is a `&mut` the caller owns, so it cannot
        // overlap the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.chunks.backing.map().as_ptr().add(offset as usize),
                dst.as_mut_ptr(),
                dst.len(),
            );
        }
    }
}
