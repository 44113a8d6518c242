//! Change tracking and point-in-time copies: how an export is saved to an image while clients
//! keep writing.
//!
//! A [`Snapshot`] copies the disk in passes. The first copies every chunk that holds data,
//! live; meanwhile every change marks its chunk in the [`DirtyLog`] (one bit per chunk, set
//! under the chunk's write lock). Further live passes copy only the chunks marked since the
//! pass before. The final pass ([`Snapshot::finish`]) holds every write back
//! ([`Chunks::freeze`](super::chunks::Chunks::freeze): all chunk locks shared, so reads go
//! on), takes the last marks and copies those chunks: the copy is the disk as it was at that
//! moment, and the pause lasts as long as copying the last few chunks.
//!
//! Why a mark is never lost: a writer sets its chunk's bit while it holds the chunk's write
//! lock, and the copier clears a bit before it takes that chunk's lock to copy it. If the
//! write's critical section comes first, the copy sees its bytes; if it comes after, the lock
//! orders the copier's clear before the writer's mark, so the chunk is copied again in the
//! next pass.
//!
//! Once a disk has been snapshotted (or loaded from an image, [`RamDisk::mark_saved`]),
//! tracking stays on, so [`RamDisk::changed_since_saved`] can tell a periodic save that
//! nothing changed. A write then costs one relaxed load of its chunk's word, plus one atomic
//! OR the first time the chunk changes after a save.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{CHUNK_SIZE, PAGE_SIZE, RamDisk};

/// One bit per chunk: changed since the last pass.
#[derive(Debug, Default)]
pub(super) struct DirtyLog {
    /// Allocated when tracking starts (an export never saved pays nothing).
    words: OnceLock<Box<[AtomicU64]>>,
    /// A snapshot is in progress.
    busy: AtomicBool,
}

impl DirtyLog {
    /// Records that `chunk` changes. Called with the chunk's write lock held.
    pub(super) fn mark(&self, chunk: u64) {
        let Some(words) = self.words.get() else {
            return;
        };
        let word = &words[(chunk / 64) as usize];
        let bit = 1 << (chunk % 64);
        // Most writes hit a chunk already marked: a load keeps the cache line shared.
        if word.load(Ordering::Relaxed) & bit == 0 {
            word.fetch_or(bit, Ordering::Relaxed);
        }
    }

    fn start(&self, chunks: u64) -> &[AtomicU64] {
        self.words.get_or_init(|| {
            (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect()
        })
    }

    /// The marked chunks, clearing their marks.
    fn take(&self) -> Vec<u64> {
        let Some(words) = self.words.get() else {
            return Vec::new();
        };
        let mut chunks = Vec::new();
        for (i, word) in words.iter().enumerate() {
            if word.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = word.swap(0, Ordering::Relaxed);
            while bits != 0 {
                chunks.push(i as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        chunks
    }

    fn count(&self) -> u64 {
        self.words.get().map_or(0, |words| {
            words
                .iter()
                .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
                .sum()
        })
    }
}

/// Another snapshot of the same disk is in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a snapshot of this disk is already in progress")]
pub struct SnapshotBusy;

/// A point-in-time copy of a disk in progress: see the module documentation. Dropping it
/// (finished or not) lets the next one start.
#[derive(Debug)]
pub struct Snapshot<'a> {
    disk: &'a RamDisk,
}

/// What [`Snapshot::finish`] measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pause {
    /// How long writes were held back.
    pub length: Duration,
    /// Chunks copied while they were.
    pub chunks: u64,
}

impl RamDisk {
    /// Starts a snapshot, and change tracking from now on for as long as the disk lives.
    pub fn snapshot(&self) -> Result<Snapshot<'_>, SnapshotBusy> {
        if self.dirty.busy.swap(true, Ordering::Acquire) {
            return Err(SnapshotBusy);
        }
        let snapshot = Snapshot { disk: self };
        self.dirty.start(self.chunk_count());
        // Marks from before are about an older copy: this one copies every held chunk anyway.
        self.dirty.take();
        Ok(snapshot)
    }

    /// Declares the disk's contents saved as they are now (just loaded from an image), and
    /// starts change tracking.
    pub fn mark_saved(&self) {
        self.dirty.start(self.chunk_count());
        self.dirty.take();
    }

    /// Whether anything changed since the last snapshot's final pass or [`mark_saved`]; true if
    /// there was neither.
    ///
    /// [`mark_saved`]: RamDisk::mark_saved
    pub fn changed_since_saved(&self) -> bool {
        self.dirty.words.get().is_none() || self.dirty.count() > 0
    }

    fn chunk_count(&self) -> u64 {
        self.size.div_ceil(CHUNK_SIZE)
    }
}

impl Snapshot<'_> {
    /// The chunks holding data now (a lock-free look at the allocation map).
    pub fn held_chunks(&self) -> impl Iterator<Item = u64> + '_ {
        let map = self.disk.chunks.map();
        (0..map.words() as u64).filter(|&chunk| map.bits(chunk) != 0)
    }

    /// The chunks changed since the snapshot started or this was last called, clearing
    /// their marks: the next live pass.
    pub fn take_changed(&self) -> Vec<u64> {
        self.disk.dirty.take()
    }

    /// How many chunks changed since the last [`take_changed`](Self::take_changed).
    pub fn changed_count(&self) -> u64 {
        self.disk.dirty.count()
    }

    /// Copies `chunk` as it is now: the held pages' bytes go to their offsets in `buf`
    /// (`CHUNK_SIZE` bytes; the rest is left as it was), and the chunk's allocation bits are
    /// returned (bit n: page n holds data).
    ///
    /// # Panics
    /// If `chunk` is past the export or `buf` is shorter than a chunk.
    pub fn copy_chunk(&self, chunk: u64, buf: &mut [u8]) -> u64 {
        let guard = self.disk.chunks.read(chunk);
        let bits = guard.allocated();
        copy_pages(self.disk.size, chunk, bits, buf, |offset, dst| {
            guard.copy_out(offset, dst);
        });
        bits
    }

    /// The final pass: holds every write back, copies each chunk changed since the last
    /// [`take_changed`](Self::take_changed) into `buf` and hands it to `sink` (chunk, bits,
    /// bytes as [`copy_chunk`](Self::copy_chunk) leaves them), then lets writes go on. `sink`
    /// runs while writes wait: it should be quick (a write into the page cache). Stops at the
    /// first error.
    pub fn finish<E>(
        self,
        buf: &mut [u8],
        mut sink: impl FnMut(u64, u64, &[u8]) -> Result<(), E>,
    ) -> Result<Pause, E> {
        let started = Instant::now();
        let frozen = self.disk.chunks.freeze();
        let changed = self.disk.dirty.take();
        for &chunk in &changed {
            let bits = frozen.allocated(chunk);
            copy_pages(self.disk.size, chunk, bits, buf, |offset, dst| {
                frozen.copy_out(offset, dst);
            });
            sink(chunk, bits, buf)?;
        }
        drop(frozen);
        Ok(Pause {
            length: started.elapsed(),
            chunks: changed.len() as u64,
        })
    }
}

impl Drop for Snapshot<'_> {
    fn drop(&mut self) {
        self.disk.dirty.busy.store(false, Ordering::Release);
    }
}

/// Copies the pages of `chunk` whose bit is set in `bits` with `copy(offset, dst)`, each to its
/// place in `buf`; the last page of an odd-sized export only up to the export's end.
fn copy_pages(
    size: u64,
    chunk: u64,
    bits: u64,
    buf: &mut [u8],
    mut copy: impl FnMut(u64, &mut [u8]),
) {
    assert!(
        buf.len() as u64 >= CHUNK_SIZE,
        "buffer shorter than a chunk"
    );
    let start = chunk * CHUNK_SIZE;
    let mut rest = bits;
    while rest != 0 {
        let page = u64::from(rest.trailing_zeros());
        rest &= rest - 1;
        let offset = start + page * PAGE_SIZE;
        let len = PAGE_SIZE.min(size - offset);
        let at = (page * PAGE_SIZE) as usize;
        copy(offset, &mut buf[at..at + len as usize]);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::super::{CHUNK_SIZE, PAGE_SIZE, RamDisk, ZeroMode};

    fn page(byte: u8) -> Vec<u8> {
        vec![byte; PAGE_SIZE as usize]
    }

    #[test]
    fn a_snapshot_sees_held_chunks_and_then_only_what_changed() {
        let disk = RamDisk::new(16 * CHUNK_SIZE).unwrap();
        disk.write(0, &page(1)).unwrap();
        disk.write(5 * CHUNK_SIZE + PAGE_SIZE, &page(2)).unwrap();
        let snapshot = disk.snapshot().unwrap();
        assert_eq!(snapshot.held_chunks().collect::<Vec<_>>(), [0, 5]);
        assert_eq!(
            snapshot.changed_count(),
            0,
            "writes before the snapshot are not changes"
        );
        disk.write(7 * CHUNK_SIZE, &page(3)).unwrap();
        disk.zero(0, CHUNK_SIZE, ZeroMode::Release).unwrap();
        disk.write(7 * CHUNK_SIZE + PAGE_SIZE, &page(4)).unwrap();
        assert_eq!(snapshot.changed_count(), 2);
        assert_eq!(snapshot.take_changed(), [0, 7]);
        assert_eq!(snapshot.changed_count(), 0);

        let mut buf = vec![0xee; CHUNK_SIZE as usize];
        assert_eq!(snapshot.copy_chunk(7, &mut buf), 0b11);
        assert_eq!(&buf[..PAGE_SIZE as usize], &page(3)[..]);
        assert_eq!(
            &buf[PAGE_SIZE as usize..2 * PAGE_SIZE as usize],
            &page(4)[..]
        );
        assert_eq!(
            buf[2 * PAGE_SIZE as usize],
            0xee,
            "pages not held are left alone"
        );
        assert_eq!(
            snapshot.copy_chunk(0, &mut buf),
            0,
            "the zeroed chunk holds nothing"
        );
    }

    #[test]
    fn the_final_pass_copies_the_last_changes() {
        let disk = RamDisk::new(4 * CHUNK_SIZE).unwrap();
        let snapshot = disk.snapshot().unwrap();
        disk.write(3 * CHUNK_SIZE + 2 * PAGE_SIZE, &page(9))
            .unwrap();
        let mut seen = Vec::new();
        let mut buf = vec![0; CHUNK_SIZE as usize];
        let pause = snapshot
            .finish(&mut buf, |chunk, bits, data| {
                let at = 2 * PAGE_SIZE as usize;
                seen.push((chunk, bits, data[at]));
                Ok::<_, ()>(())
            })
            .unwrap();
        assert_eq!(seen, [(3, 0b100, 9)]);
        assert_eq!(pause.chunks, 1);
    }

    #[test]
    fn writes_wait_for_the_final_pass_and_reads_do_not() {
        let disk = RamDisk::new(4 * CHUNK_SIZE).unwrap();
        disk.write(0, &page(1)).unwrap();
        let snapshot = disk.snapshot().unwrap();
        disk.write(0, &page(2)).unwrap();
        let frozen = AtomicBool::new(false);
        let thawed = AtomicBool::new(false);
        let mut buf = vec![0; CHUNK_SIZE as usize];
        std::thread::scope(|s| {
            let pause = snapshot.finish(&mut buf, |_, _, data| {
                frozen.store(true, Ordering::SeqCst);
                // A reader on another thread is served while writes are held back.
                let read = s.spawn(|| {
                    let mut out = page(0);
                    disk.read(0, &mut out);
                    out[0]
                });
                assert_eq!(read.join().unwrap(), 2);
                let writer = s.spawn(|| {
                    disk.write(3 * CHUNK_SIZE, &page(7)).unwrap();
                    assert!(
                        thawed.load(Ordering::SeqCst),
                        "a write ran during the pause"
                    );
                });
                std::thread::sleep(Duration::from_millis(50));
                assert!(!writer.is_finished(), "the write went through the pause");
                assert_eq!(data[0], 2, "the copy has the last write before the pause");
                thawed.store(true, Ordering::SeqCst);
                Ok::<_, ()>(())
            });
            assert!(pause.unwrap().length >= Duration::from_millis(50));
        });
        assert!(frozen.load(Ordering::SeqCst));
        let mut out = page(0);
        disk.read(3 * CHUNK_SIZE, &mut out);
        assert_eq!(out, page(7));
    }

    #[test]
    fn one_snapshot_at_a_time() {
        let disk = RamDisk::new(CHUNK_SIZE).unwrap();
        let first = disk.snapshot().unwrap();
        assert!(disk.snapshot().is_err());
        drop(first);
        assert!(disk.snapshot().is_ok());
    }

    #[test]
    fn changes_since_the_last_save_are_known() {
        let disk = RamDisk::new(4 * CHUNK_SIZE).unwrap();
        assert!(disk.changed_since_saved(), "never saved");
        disk.mark_saved();
        assert!(!disk.changed_since_saved());
        disk.write(CHUNK_SIZE, &page(1)).unwrap();
        assert!(disk.changed_since_saved());
        let mut buf = vec![0; CHUNK_SIZE as usize];
        let snapshot = disk.snapshot().unwrap();
        snapshot
            .finish(&mut buf, |_, _, _| Ok::<_, ()>(()))
            .unwrap();
        assert!(!disk.changed_since_saved());
        disk.zero(0, 4 * CHUNK_SIZE, ZeroMode::Release).unwrap();
        assert!(disk.changed_since_saved(), "a trim is a change");
    }
}
