//! The operating-system calls the store makes on its own mappings (and the files behind them), each wrapped once with its
//! safety argument. The wrappers take the mapping itself plus a range that they check, so no
//! caller can aim them at memory the store does not own.

use std::io;
use std::ops::Range;

use std::os::fd::BorrowedFd;

use memmap2::{Advice, MmapRaw, UncheckedAdvice};
use rustix::fs::FallocateFlags;
use rustix::mm::MlockFlags;
use rustix::process::{Resource, getrlimit};

use super::PAGE_SIZE;

/// Panics unless `range` is page-aligned at its start and lies inside `map` (a range may end at
/// the mapping's end, which the kernel rounds up to a page).
fn check_range(map: &MmapRaw, range: &Range<usize>) {
    assert!(
        range.start <= range.end
            && range.end <= map.len()
            && range.start.is_multiple_of(PAGE_SIZE as usize),
        "range {range:?} is not a page-aligned part of a {}-byte mapping",
        map.len()
    );
}

/// Locks the pages of `range` in RAM as they fault in (`mlock2(MLOCK_ONFAULT)`), so written
/// data is never swapped out. Fails with a message naming RLIMIT_MEMLOCK and the fix.
pub(super) fn lock_on_fault(map: &MmapRaw, range: Range<usize>) -> io::Result<()> {
    check_range(map, &range);
    // SAFETY: the range lies inside a live mapping that `map` owns (checked above); mlock2
    // changes only its locking attribute and reads or writes no memory.
    let locked = unsafe {
        rustix::mm::mlock_with(
            map.as_mut_ptr().add(range.start).cast(),
            range.len(),
            MlockFlags::ONFAULT,
        )
    };
    locked.map_err(|errno| {
        let limit = match getrlimit(Resource::Memlock).current {
            None => "unlimited".to_owned(),
            Some(bytes) => format!("{bytes} bytes"),
        };
        io::Error::new(
            io::Error::from(errno).kind(),
            format!(
                "mlock of {} bytes failed ({errno}): RLIMIT_MEMLOCK is {limit}; raise it to at \
                 least the export size (systemd: LimitMEMLOCK=infinity; shell: ulimit -l \
                 unlimited), or grant CAP_IPC_LOCK, or drop --mlock",
                range.len()
            ),
        )
    })
}

/// Unlocks the pages of `range` (undoes [`lock_on_fault`] there).
pub(super) fn unlock(map: &MmapRaw, range: Range<usize>) -> io::Result<()> {
    check_range(map, &range);
    // SAFETY: as for `lock_on_fault`: a range of our own live mapping, attribute change only.
    unsafe { rustix::mm::munlock(map.as_mut_ptr().add(range.start).cast(), range.len()) }
        .map_err(io::Error::from)
}

/// `madvise(MADV_POPULATE_WRITE)` (Linux 5.14): faults the pages of `range` in writable, as a
/// write to each would, in one system call instead of one page fault per page, without
/// changing what they read (a page not yet backed becomes a zeroed page that costs RAM). Fails
/// with `EINVAL` on a kernel without it; on any failure some pages may have been populated.
pub(super) fn populate_write(map: &MmapRaw, range: Range<usize>) -> io::Result<()> {
    check_range(map, &range);
    // A safe advice (memmap2's `Advice`): it reads and writes no data another thread could
    // see change.
    map.advise_range(Advice::PopulateWrite, range.start, range.len())
}

/// `madvise(MADV_DONTNEED)`: drops the pages of `range` from a private anonymous mapping, which
/// then reads as zero-fill-on-demand pages, and gives their RAM back to the kernel.
///
/// # Safety
/// No other thread may read or write the bytes of `range` during the call, and no reference
/// into them may exist: their contents change underneath.
pub(super) unsafe fn drop_pages(map: &MmapRaw, range: Range<usize>) -> io::Result<()> {
    check_range(map, &range);
    // SAFETY: inside the mapping (checked above); the caller guarantees that nothing else
    // accesses or references these bytes, which is what memmap2 asks of this advice.
    unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, range.start, range.len()) }
}

/// `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)` on `fd`, the file `map` maps
/// from offset 0: frees the file's pages in `range` (their RAM, for a memfd), which then read as
/// zero through every mapping of the file.
///
/// # Safety
/// As for [`drop_pages`]: no other thread may read or write the bytes of `range` in `map`
/// during the call, and no reference into them may exist. `fd` must be the file `map` maps.
pub(super) unsafe fn punch_hole(
    map: &MmapRaw,
    fd: BorrowedFd<'_>,
    range: Range<usize>,
) -> io::Result<()> {
    check_range(map, &range);
    // The end may be short of a page only at the mapping's end, which the file's size (whole
    // pages) covers: round up so the last page goes too.
    let end = range
        .end
        .next_multiple_of(PAGE_SIZE as usize)
        .min(map.len());
    rustix::fs::fallocate(
        fd,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        range.start as u64,
        (end - range.start) as u64,
    )
    .map_err(io::Error::from)
}

/// How many pages of `range` are resident in RAM (`mincore`). `status` is scratch space with a
/// byte per page of the range.
pub(super) fn resident_pages(map: &MmapRaw, range: Range<usize>, status: &mut Vec<u8>) -> u64 {
    check_range(map, &range);
    let pages = range.len().div_ceil(PAGE_SIZE as usize);
    status.clear();
    status.resize(pages, 0);
    // SAFETY: the range lies inside our live mapping (checked above) and `status` has one byte
    // per page of it. mincore only reads page tables: it touches no data another thread may be
    // writing.
    let rc = unsafe {
        libc::mincore(
            map.as_mut_ptr().add(range.start).cast(),
            range.len(),
            status.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return 0;
    }
    status.iter().filter(|&&page| page & 1 != 0).count() as u64
}
