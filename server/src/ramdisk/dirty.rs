//! Change tracking and point-in-time copies: how an export is saved to an image while clients
//! keep writing.
//!
//! A [`Snapshot`] copies the disk in passes. The first copies every chunk that holds data,
//! live; meanwhile every change marks the pages it touches in the [`DirtyLog`] (one bit per
//! page, set under the chunk's write lock). Further live passes copy only the pages marked
//! since the pass before. The final pass ([`Snapshot::finish`]) holds every write back
//! ([`Chunks::freeze`](super::chunks::Chunks::freeze): all chunk locks shared, so reads go
//! on), takes the last marks and copies those pages: the copy is the disk as it was at that
//! moment, and the pause lasts as long as copying the pages changed during the last live pass.
//! Pages, not chunks, are tracked so that scattered small writes (a filesystem's) leave a
//! small final pass: 4 KiB each rather than 256 KiB.
//!
//! Why a mark is never lost: a writer sets its pages' bits while it holds the chunk's write
//! lock, and the copier clears a chunk's bits before it takes that chunk's lock to copy it. If
//! the write's critical section comes first, the copy sees its bytes; if it comes after, the
//! lock orders the copier's clear before the writer's mark, so the pages are copied again in
//! the next pass.
//!
//! Once a disk has been snapshotted (or loaded from an image, [`RamDisk::mark_saved`]),
//! tracking stays on, so [`RamDisk::changed_since_saved`] can tell a periodic save that
//! nothing changed. A write then costs one relaxed load of its chunk's word, plus one atomic
//! OR the first time its pages change after a pass.

use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::alloc_map::AllocationMap;
use super::{CHUNK_SIZE, PAGE_SIZE, RamDisk};

/// One bit per page: changed since the last pass. The same layout as the allocation map (one
/// word per chunk, lazily backed), so it is one.
#[derive(Debug, Default)]
pub(super) struct DirtyLog {
    /// Created when tracking starts (an export never saved pays nothing).
    map: OnceLock<AllocationMap>,
    /// A snapshot is in progress.
    busy: AtomicBool,
    /// The longest final pass so far, in microseconds.
    longest_pause_us: AtomicU64,
}

impl DirtyLog {
    /// Records that the pages `bits` of `chunk` change. Called with the chunk's write lock held.
    pub(super) fn mark(&self, chunk: u64, bits: u64) {
        let Some(map) = self.map.get() else {
            return;
        };
        let word = map.word(chunk);
        // Most writes hit pages already marked: a load keeps the cache line shared.
        if word.load(Ordering::Relaxed) & bits != bits {
            map.set(word, bits);
        }
    }

    fn start(&self, words: usize) -> io::Result<&AllocationMap> {
        if self.map.get().is_none() {
            // Only a snapshot (one at a time) or a load starts tracking; should two race, the
            // loser's map is dropped.
            let _ = self.map.set(AllocationMap::new(words)?);
        }
        Ok(self.map.get().expect("set above"))
    }

    /// Takes the marks of every chunk, in order: `(chunk, pages)`.
    fn take(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let map = self.map.get();
        let words = map.map_or(0, AllocationMap::words) as u64;
        (0..words).filter_map(move |chunk| {
            let map = map?;
            let word = map.word(chunk);
            if word.load(Ordering::Relaxed) == 0 {
                return None;
            }
            Some((chunk, map.take(word)))
        })
    }

    /// Pages marked.
    fn count(&self) -> u64 {
        self.map.get().map_or(0, AllocationMap::allocated_pages)
    }
}

/// Why a snapshot cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("a snapshot of this disk is already in progress")]
    Busy,
    #[error("cannot map the change-tracking bitmap: {0}")]
    Map(#[from] io::Error),
}

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
    /// Of that, how long taking every chunk lock took (waiting for writes in progress).
    pub freezing: Duration,
    /// Pages copied while they were.
    pub pages: u64,
}

/// One chunk's pages as copied: see [`Snapshot::copy_chunk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    pub chunk: u64,
    /// The pages copied (bit n: page n of the chunk).
    pub pages: u64,
    /// Of those, the ones holding data; the others read as zero.
    pub held: u64,
}

impl RamDisk {
    /// Starts a snapshot, and change tracking from now on for as long as the disk lives.
    pub fn snapshot(&self) -> Result<Snapshot<'_>, SnapshotError> {
        if self.dirty.busy.swap(true, Ordering::Acquire) {
            return Err(SnapshotError::Busy);
        }
        let snapshot = Snapshot { disk: self };
        self.dirty.start(self.chunks.map().words())?;
        // Marks from before are about an older copy: this one copies every held chunk anyway.
        self.dirty.take().for_each(drop);
        Ok(snapshot)
    }

    /// Declares the disk's contents saved as they are now (just loaded from an image), and
    /// starts change tracking.
    pub fn mark_saved(&self) -> io::Result<()> {
        self.dirty.start(self.chunks.map().words())?;
        self.dirty.take().for_each(drop);
        Ok(())
    }

    /// The longest time a snapshot's final pass held writes back (zero before the first).
    pub fn longest_snapshot_pause(&self) -> Duration {
        Duration::from_micros(self.dirty.longest_pause_us.load(Ordering::Relaxed))
    }

    /// Whether anything changed since the last snapshot's final pass or [`mark_saved`]; true if
    /// there was neither.
    ///
    /// [`mark_saved`]: RamDisk::mark_saved
    pub fn changed_since_saved(&self) -> bool {
        self.dirty.map.get().is_none() || self.dirty.count() > 0
    }
}

impl Snapshot<'_> {
    /// The chunks holding data now (a lock-free look at the allocation map).
    pub fn held_chunks(&self) -> impl Iterator<Item = u64> + '_ {
        let map = self.disk.chunks.map();
        (0..map.words() as u64).filter(|&chunk| map.bits(chunk) != 0)
    }

    /// The pages changed since the snapshot started or they were last taken, chunk by chunk
    /// in order, `(chunk, pages)`, each chunk's marks cleared as it is reached: the next live
    /// pass.
    pub fn take_changed(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.disk.dirty.take()
    }

    /// How many pages changed since they were last taken.
    pub fn changed_pages(&self) -> u64 {
        self.disk.dirty.count()
    }

    /// Copies the pages `pages` of `chunk` as they are now: those holding data go to their
    /// offsets in `buf` (`CHUNK_SIZE` bytes; the rest is left as it was).
    ///
    /// # Panics
    /// If `chunk` is past the export or `buf` is shorter than a chunk.
    pub fn copy_chunk(&self, chunk: u64, pages: u64, buf: &mut [u8]) -> Copied {
        let guard = self.disk.chunks.read(chunk);
        let held = guard.allocated() & pages;
        copy_pages(self.disk.size, chunk, held, buf, |offset, dst| {
            guard.copy_out(offset, dst);
        });
        Copied { chunk, pages, held }
    }

    /// The final pass: holds every write back, copies the pages changed since they were last
    /// taken, chunk by chunk, into `buf` and hands each chunk to `sink` (as
    /// [`copy_chunk`](Self::copy_chunk) leaves `buf`), then lets writes go on. `sink` runs
    /// while writes wait: it should be quick. Stops at the first error.
    pub fn finish<E>(
        self,
        buf: &mut [u8],
        mut sink: impl FnMut(Copied, &[u8]) -> Result<(), E>,
    ) -> Result<Pause, E> {
        let started = Instant::now();
        let frozen = self.disk.chunks.freeze();
        let freezing = started.elapsed();
        let mut copied = 0;
        for (chunk, pages) in self.disk.dirty.take() {
            let held = frozen.allocated(chunk) & pages;
            copy_pages(self.disk.size, chunk, held, buf, |offset, dst| {
                frozen.copy_out(offset, dst);
            });
            copied += u64::from(pages.count_ones());
            sink(Copied { chunk, pages, held }, buf)?;
        }
        drop(frozen);
        let length = started.elapsed();
        let us = u64::try_from(length.as_micros()).unwrap_or(u64::MAX);
        self.disk
            .dirty
            .longest_pause_us
            .fetch_max(us, Ordering::Relaxed);
        Ok(Pause {
            length,
            freezing,
            pages: copied,
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
    use super::Copied;

    fn page(byte: u8) -> Vec<u8> {
        vec![byte; PAGE_SIZE as usize]
    }

    #[test]
    fn a_snapshot_sees_held_chunks_and_then_only_the_pages_that_changed() {
        let disk = RamDisk::new(16 * CHUNK_SIZE).unwrap();
        disk.write(0, &page(1)).unwrap();
        disk.write(5 * CHUNK_SIZE + PAGE_SIZE, &page(2)).unwrap();
        let snapshot = disk.snapshot().unwrap();
        assert_eq!(snapshot.held_chunks().collect::<Vec<_>>(), [0, 5]);
        assert_eq!(
            snapshot.changed_pages(),
            0,
            "writes before the snapshot are not changes"
        );
        disk.write(7 * CHUNK_SIZE, &page(3)).unwrap();
        disk.zero(0, CHUNK_SIZE, ZeroMode::Release).unwrap();
        disk.write(7 * CHUNK_SIZE + PAGE_SIZE, &page(4)).unwrap();
        // Written again: still one mark.
        disk.write(7 * CHUNK_SIZE + PAGE_SIZE, &page(4)).unwrap();
        assert_eq!(snapshot.changed_pages(), 64 + 2);
        let changed: Vec<_> = snapshot.take_changed().collect();
        assert_eq!(changed, [(0, u64::MAX), (7, 0b11)]);
        assert_eq!(snapshot.changed_pages(), 0);

        let mut buf = vec![0xee; CHUNK_SIZE as usize];
        let copied = snapshot.copy_chunk(7, 0b10, &mut buf);
        assert_eq!(
            copied,
            Copied {
                chunk: 7,
                pages: 0b10,
                held: 0b10
            }
        );
        assert_eq!(
            &buf[PAGE_SIZE as usize..2 * PAGE_SIZE as usize],
            &page(4)[..]
        );
        assert_eq!(buf[0], 0xee, "pages not asked for are left alone");
        let copied = snapshot.copy_chunk(0, u64::MAX, &mut buf);
        assert_eq!(copied.held, 0, "the zeroed chunk holds nothing");
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
            .finish(&mut buf, |copied, data| {
                seen.push((copied, data[2 * PAGE_SIZE as usize]));
                Ok::<_, ()>(())
            })
            .unwrap();
        let copied = Copied {
            chunk: 3,
            pages: 0b100,
            held: 0b100,
        };
        assert_eq!(seen, [(copied, 9)]);
        assert_eq!(pause.pages, 1);
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
            let pause = snapshot.finish(&mut buf, |_, data| {
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
            let pause = pause.unwrap().length;
            assert!(pause >= Duration::from_millis(50));
            assert!(disk.longest_snapshot_pause() >= pause - Duration::from_micros(1));
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
        disk.mark_saved().unwrap();
        assert!(!disk.changed_since_saved());
        disk.write(CHUNK_SIZE, &page(1)).unwrap();
        assert!(disk.changed_since_saved());
        let mut buf = vec![0; CHUNK_SIZE as usize];
        let snapshot = disk.snapshot().unwrap();
        snapshot.finish(&mut buf, |_, _| Ok::<_, ()>(())).unwrap();
        assert!(!disk.changed_since_saved());
        disk.zero(0, 4 * CHUNK_SIZE, ZeroMode::Release).unwrap();
        assert!(disk.changed_since_saved(), "a trim is a change");
    }
}
