//! Where an export's bytes live. The store reads and writes them through one mapping and asks
//! the backing to give pages back; everything else (locks, allocation map, budgets) is the
//! same whatever the backing. Two kinds: [`Anonymous`] memory dies with the process; a
//! [`Memfd`] is a file in RAM whose descriptor can be handed to a service manager and adopted
//! by the next process, data and all.

use std::fmt;
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use memmap2::{Advice, MmapOptions, MmapRaw};
use rustix::fs::{FileType, MemfdFlags, SealFlags};

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

    /// The file descriptor behind the mapping, for a backing that has one.
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// How the memory is managed: see `MemoryOptions`.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Policy {
    pub(super) mlock: bool,
    pub(super) hugepages: bool,
}

impl Policy {
    pub(super) fn of(options: &super::MemoryOptions) -> Self {
        Self {
            mlock: options.mlock,
            hugepages: options.hugepages,
        }
    }
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
        let len = mapping_len(size)?;
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

/// Most bytes of a memfd name (the kernel's limit, 249, less a margin it does not document);
/// the name only labels the descriptor in /proc/PID/fd.
const MEMFD_NAME_MAX: usize = 240;

/// Seals that keep the file's size fixed: a file shrunk under the mapping would make every
/// access past its new end a SIGBUS, so a backing file must not be able to change size.
const SIZE_SEALS: SealFlags = SealFlags::SHRINK.union(SealFlags::GROW);

/// A memfd (a file in RAM, shmem) mapped `MAP_SHARED`. Pages get RAM on their first write like
/// anonymous memory, and hole punching (`FALLOC_FL_PUNCH_HOLE`) gives them back. Unlike
/// anonymous memory it outlives the process as long as some process (the service manager's
/// file-descriptor store) holds the descriptor, and [`Memfd::adopt`] maps it again.
///
/// The file is sealed against shrinking and growing. The descriptor may be shared with a
/// service manager that stores it; nothing else maps it while this process runs (the store's
/// locking argument assumes that no other process writes the bytes, as it assumes nobody
/// writes /proc/PID/mem).
#[derive(Debug)]
pub(super) struct Memfd {
    fd: OwnedFd,
    map: MmapRaw,
}

impl Memfd {
    /// A new, empty memfd labelled `name`, sized to `size` rounded up to whole pages.
    pub(super) fn create(name: &str, size: u64, policy: Policy) -> io::Result<Self> {
        let len = mapping_len(size)?;
        let fd = rustix::fs::memfd_create(
            memfd_name(name),
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(|err| with_context(err.into(), "memfd_create"))?;
        rustix::fs::ftruncate(&fd, len as u64)
            .map_err(|err| with_context(err.into(), &format!("ftruncate to {len} bytes")))?;
        rustix::fs::fcntl_add_seals(&fd, SIZE_SEALS)
            .map_err(|err| with_context(err.into(), "sealing the memfd's size"))?;
        Self::map(fd, len, policy)
    }

    /// Maps an existing file (a memfd a previous process created) holding an export of
    /// `size` bytes. The file must be a regular file of exactly `size` rounded up to whole
    /// pages, sealed (or sealable) against size changes. Its contents are left as they are.
    pub(super) fn adopt(fd: OwnedFd, size: u64, policy: Policy) -> io::Result<Self> {
        let len = mapping_len(size)?;
        let stat = rustix::fs::fstat(&fd).map_err(io::Error::from)?;
        let kind = FileType::from_raw_mode(stat.st_mode);
        if kind != FileType::RegularFile {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the descriptor to adopt is a {kind:?}, not a memfd or regular file"),
            ));
        }
        if stat.st_size as u64 != len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the file to adopt holds {} bytes, but an export of {size} bytes needs \
                     {len} (its size rounded up to whole pages): was the export's size \
                     changed?",
                    stat.st_size
                ),
            ));
        }
        // Seal it if that has not been done (or cannot be undone); either way it must end up
        // sealed against size changes.
        let _ = rustix::fs::fcntl_add_seals(&fd, SIZE_SEALS);
        let sealed = rustix::fs::fcntl_get_seals(&fd).unwrap_or(SealFlags::empty());
        if !sealed.contains(SIZE_SEALS) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the file to adopt cannot be sealed against size changes (not a memfd \
                 created with MFD_ALLOW_SEALING?): a file that can shrink under the mapping \
                 would crash the server",
            ));
        }
        Self::map(fd, len, policy)
    }

    fn map(fd: OwnedFd, len: usize, policy: Policy) -> io::Result<Self> {
        let map = MmapOptions::new().len(len).map_raw(&fd)?;
        map.advise(Advice::DontDump)?;
        if policy.hugepages {
            shmem_hugepages_enabled()?;
            map.advise(Advice::HugePage).map_err(|err| {
                io::Error::new(err.kind(), format!("madvise(MADV_HUGEPAGE): {err}"))
            })?;
        }
        if policy.mlock {
            os::lock_on_fault(&map, 0..len)?;
        }
        Ok(Self { fd, map })
    }

    /// The byte ranges of the file that hold data (`SEEK_DATA`/`SEEK_HOLE`), in order.
    pub(super) fn data_ranges(&self) -> io::Result<Vec<Range<u64>>> {
        use rustix::fs::SeekFrom;
        let len = self.map.len() as u64;
        let mut ranges = Vec::new();
        let mut pos = 0;
        while pos < len {
            let start = match rustix::fs::seek(&self.fd, SeekFrom::Data(pos)) {
                Ok(start) => start,
                // No data at or after `pos`.
                Err(rustix::io::Errno::NXIO) => break,
                Err(err) => return Err(with_context(err.into(), "lseek(SEEK_DATA)")),
            };
            let end = rustix::fs::seek(&self.fd, SeekFrom::Hole(start))
                .map_err(|err| with_context(err.into(), "lseek(SEEK_HOLE)"))?
                .min(len);
            ranges.push(start..end);
            pos = end;
        }
        Ok(ranges)
    }
}

impl Backing for Memfd {
    fn map(&self) -> &MmapRaw {
        &self.map
    }

    unsafe fn discard(&self, range: Range<usize>) -> io::Result<()> {
        // Punching a hole frees the shmem pages (the RAM) and unmaps them from every mapping,
        // mlocked ones included; the range then reads as zero. The mapping stays locked
        // on-fault, so no unlock and relock is needed.
        // SAFETY: the caller guarantees exclusive access to the range.
        unsafe { os::punch_hole(&self.map, self.fd.as_fd(), range) }
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.fd.as_fd())
    }
}

/// The mapping length for an export of `size` bytes: whole pages.
fn mapping_len(size: u64) -> io::Result<usize> {
    usize::try_from(size.div_ceil(PAGE_SIZE) * PAGE_SIZE)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "export size too large"))
}

/// `ramnbd:NAME`, cut to the kernel's limit at a character boundary, without NUL bytes.
fn memfd_name(name: &str) -> String {
    let mut label = String::from("ramnbd:");
    for c in name.chars().filter(|&c| c != '\0') {
        if label.len() + c.len_utf8() > MEMFD_NAME_MAX {
            break;
        }
        label.push(c);
    }
    label
}

fn with_context(err: io::Error, what: &str) -> io::Error {
    io::Error::new(err.kind(), format!("{what}: {err}"))
}

/// Transparent huge pages for shmem (and so memfds) follow
/// /sys/kernel/mm/transparent_hugepage/shmem_enabled (or, since Linux 6.11, the per-size
/// `hugepages-*/shmem_enabled` files), not the anonymous-memory setting: `MADV_HUGEPAGE`
/// succeeds but does nothing under `never` or `deny`. Fails with the fix unless some setting
/// lets an advised mapping get huge pages.
fn shmem_hugepages_enabled() -> io::Result<()> {
    const THP: &str = "/sys/kernel/mm/transparent_hugepage";
    let selected = |path: &str| -> Option<String> {
        let text = std::fs::read_to_string(path).ok()?;
        let start = text.find('[')? + 1;
        let end = start + text[start..].find(']')?;
        Some(text[start..end].to_owned())
    };
    let allows = |mode: &str| matches!(mode, "always" | "within_size" | "advise" | "force");
    let top = selected(&format!("{THP}/shmem_enabled"));
    let per_size = std::fs::read_dir(THP)
        .into_iter()
        .flatten()
        .flatten()
        .any(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("hugepages-")
                && selected(&format!("{}/shmem_enabled", entry.path().display()))
                    .is_some_and(|mode| allows(&mode))
        });
    if top.as_deref().is_some_and(allows) || per_size {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        format!(
            "hugepages with the memfd backing need shmem huge pages, but \
             {THP}/shmem_enabled is {}: set it to advise (echo advise > \
             {THP}/shmem_enabled), or use backing = \"anonymous\", or drop hugepages",
            top.as_deref().unwrap_or("missing")
        ),
    ))
}
