//! The allocation map: one bit per page, set when the page may hold data (it is or was
//! populated), clear when it reads as zero without costing RAM. It answers `base:allocation`
//! block status, lets reads of unwritten pages skip the mapping, and counts the pages held.
//!
//! The bits live in a second anonymous mapping (so a 1 TiB export's 32 MiB map costs RAM only
//! where something was written), viewed as `AtomicU64` words: one word per chunk, so it is
//! shared without locks. A word is only changed through its chunk's write guard (see
//! `chunks`), which keeps bit and data consistent for readers holding the read lock.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};

#[derive(Debug)]
pub(super) struct AllocationMap {
    words: MmapRaw,
    count: usize,
    allocated_pages: AtomicU64,
}

impl AllocationMap {
    /// A map of `count` words, all clear.
    pub(super) fn new(count: usize) -> io::Result<Self> {
        let len = count
            .checked_mul(size_of::<AtomicU64>())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "export size too large"))?;
        let words = MmapRaw::from(MmapOptions::new().len(len).no_reserve_swap().map_anon()?);
        words.advise(memmap2::Advice::DontDump)?;
        Ok(Self {
            words,
            count,
            allocated_pages: AtomicU64::new(0),
        })
    }

    pub(super) fn words(&self) -> usize {
        self.count
    }

    /// The word of `chunk`.
    pub(super) fn word(&self, chunk: u64) -> &AtomicU64 {
        let index = usize::try_from(chunk).unwrap_or(usize::MAX);
        assert!(
            index < self.count,
            "chunk {chunk} outside the allocation map"
        );
        // SAFETY: `words` is a live, page-aligned (so 8-aligned) anonymous mapping of `count`
        // u64s, zero-initialised by the kernel (a valid AtomicU64), that lives as long as
        // `self`; `index < count` keeps the pointer in bounds. Every access to it goes through
        // atomics, so shared references to its words are sound.
        unsafe { &*self.words.as_ptr().cast::<AtomicU64>().add(index) }
    }

    /// A snapshot of `chunk`'s bits, without any lock: it may lag a request in flight.
    pub(super) fn bits(&self, chunk: u64) -> u64 {
        self.word(chunk).load(Ordering::Acquire)
    }

    pub(super) fn allocated_pages(&self) -> u64 {
        self.allocated_pages.load(Ordering::Relaxed)
    }

    /// Sets `bits` in `word` (a word of this map); returns how many were newly set.
    pub(super) fn set(&self, word: &AtomicU64, bits: u64) -> u64 {
        if bits == 0 {
            return 0;
        }
        let before = word.fetch_or(bits, Ordering::Release);
        let new = u64::from((bits & !before).count_ones());
        self.allocated_pages.fetch_add(new, Ordering::Relaxed);
        new
    }

    /// Sets the bits of the pages numbered `pages` (of the whole export); returns how many
    /// were newly set.
    pub(super) fn set_pages(&self, pages: std::ops::Range<u64>) -> u64 {
        let per_word = u64::BITS as u64;
        let mut new = 0;
        let mut page = pages.start;
        while page < pages.end {
            let first = page % per_word;
            let count = (per_word - first).min(pages.end - page);
            let bits = if count == per_word {
                u64::MAX
            } else {
                ((1 << count) - 1) << first
            };
            new += self.set(self.word(page / per_word), bits);
            page += count;
        }
        new
    }

    /// Clears every bit of `word`; returns the bits that were set.
    pub(super) fn take(&self, word: &AtomicU64) -> u64 {
        let before = word.swap(0, Ordering::AcqRel);
        self.allocated_pages
            .fetch_sub(u64::from(before.count_ones()), Ordering::Relaxed);
        before
    }

    /// Clears `bits` in `word`; returns how many were set before.
    pub(super) fn clear(&self, word: &AtomicU64, bits: u64) -> u64 {
        let before = word.fetch_and(!bits, Ordering::Release);
        let freed = u64::from((before & bits).count_ones());
        self.allocated_pages.fetch_sub(freed, Ordering::Relaxed);
        freed
    }
}
