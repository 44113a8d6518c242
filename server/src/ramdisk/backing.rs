//! Where an export's bytes live. The store reads and writes them through one mapping and asks
//! the backing to give pages back; everything else (locks, allocation map, budgets) is the
//! same whatever the backing, so another kind (a memfd that outlives the process) is one more
//! implementation of [`Backing`].

use std::fmt;
use std::io;
use std::ops::Range;

use memmap2::{Advice, MmapOptions, MmapRaw};

use super::{PAGE_SIZE, os};

/// The memory behind one export.
pub(super) trait Backing: Send + Sync + fmt::Debug {
    /// The mapping the store copies data through. It covers the export rounded up to whole
    /// pages and lives as long as the backing.
    fn map(&self) -> &MmapRaw;

    /// Gives the pages of `range` (page-aligned, inside the mapping) back to the system; they
    /// read as zero afterwards.
    ///
    /// # Safety
    /// No other thread may read or write the bytes of `range` during the call, and no
    /// reference into them may exist.
    unsafe fn discard(&self, range: Range<usize>) -> io::Result<()>;
}

/// How the memory is managed: see `MemoryOptions`.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Policy {
    pub(super) mlock: bool,
    pub(super) hugepages: bool,
}

/// A private anonymous mapping with `MAP_NORESERVE`: the kernel gives a page RAM on its first
/// write, so a 1 TiB export starts instantly and costs nothing until written, and
/// `MADV_DONTNEED` returns pages. It is `MADV_DONTDUMP`: a core dump of a server holding
/// 100 GiB of disk contents helps no one.
#[derive(Debug)]
pub(super) struct Anonymous {
    map: MmapRaw,
    /// Pages are locked as they fault in.
    mlocked: bool,
}

impl Anonymous {
    pub(super) fn new(size: u64, policy: Policy) -> io::Result<Self> {
        let len = usize::try_from(size.div_ceil(PAGE_SIZE) * PAGE_SIZE)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "export size too large"))?;
        let map = MmapRaw::from(MmapOptions::new().len(len).no_reserve_swap().map_anon()?);
        map.advise(Advice::DontDump)?;
        if policy.hugepages {
            map.advise(Advice::HugePage).map_err(|err| {
                io::Error::new(
                    err.kind(),
                    format!("madvise(MADV_HUGEPAGE): {err}; is THP enabled?"),
                )
            })?;
        }
        if policy.mlock {
            os::lock_on_fault(&map, 0..len)?;
        }
        Ok(Self {
            map,
            mlocked: policy.mlock,
        })
    }
}

impl Backing for Anonymous {
    fn map(&self) -> &MmapRaw {
        &self.map
    }

    unsafe fn discard(&self, range: Range<usize>) -> io::Result<()> {
        // Locked pages refuse DONTNEED: unlock them for the call, then lock the range again
        // on-fault, which also merges the mapping back into one VMA.
        if self.mlocked {
            os::unlock(&self.map, range.clone())?;
        }
        // SAFETY: the caller guarantees exclusive access to the range.
        let dropped = unsafe { os::drop_pages(&self.map, range.clone()) };
        if self.mlocked {
            os::lock_on_fault(&self.map, range)?;
        }
        dropped
    }
}
