//! The image file: a raw image of the export, exactly the export's size, sparse where the
//! export has holes, so `qemu-img`, `losetup` and `cp --sparse` work on it as it is.
//!
//! * **Save** ([`save`]): into `.NAME.tmp-PID` in the image's directory, then fsync, rename
//!   over the image, fsync the directory. Until the rename the old image is untouched, so a
//!   failed or torn save (an error, a crash, a power cut) leaves it as it was. Only held pages
//!   are written. The copy is point-in-time consistent while clients write: see
//!   [`crate::ramdisk::Snapshot`]; live passes copy most of the data, and writes wait only for
//!   the final pass, which copies the chunks changed during the last live one.
//! * **Load** ([`load`]): the file's data extents (`SEEK_DATA`/`SEEK_HOLE`) are written into
//!   the disk, which keeps no page that reads as zero. A file that is not a regular file, has
//!   the wrong size, cannot be opened or read is an error that refuses the start: starting
//!   empty would overwrite a good image at the next save.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::fs::{FallocateFlags, SeekFrom};

use crate::config::format_size;
use crate::ramdisk::{CHUNK_SIZE, Copied, NoSpace, PAGE_SIZE, Pause, RamDisk};

/// The final pass starts once at most this many pages (4 MiB) changed during a live pass.
const FINAL_PAGES: u64 = 1024;
/// The final pass copies pages into memory up to this much, and writes them to the file
/// after writes go on again; past it (writers faster than the live passes), into the file
/// while writes wait.
const FINAL_IN_MEMORY: usize = 64 << 20;
/// Live passes before the final one, whatever the writers do: a disk rewritten faster than
/// it is copied would otherwise never get there.
const MAX_LIVE_PASSES: u32 = 8;
/// Bytes read from the image per store write when loading.
const LOAD_PIECE: usize = 1 << 20;

/// A refused or failed load or save, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("image {}: {message}", path.display())]
pub struct ImageError {
    pub path: PathBuf,
    pub message: String,
}

impl ImageError {
    fn new(path: &Path, message: impl Into<String>) -> Self {
        Self {
            path: path.to_owned(),
            message: message.into(),
        }
    }
}

/// What a save did.
#[derive(Debug, Clone, Copy)]
pub struct Saved {
    /// Bytes of data the image holds.
    pub data_bytes: u64,
    /// Bytes copied in all passes (at least `data_bytes`; more when clients wrote meanwhile).
    pub copied_bytes: u64,
    /// Passes, the final one included.
    pub passes: u32,
    pub elapsed: Duration,
    /// The final pass, while writes waited.
    pub pause: Pause,
}

/// What a load found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loaded {
    /// There is no image yet: the export starts empty.
    Missing,
    /// Bytes of data read from the file's data extents.
    Data(u64),
}

/// Asks a save to stop early (a third stop signal): the save fails, the old image stays.
#[derive(Debug, Default)]
pub struct Cancel(AtomicBool);

impl Cancel {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn check(&self, path: &Path) -> Result<(), ImageError> {
        if self.0.load(Ordering::Relaxed) {
            Err(ImageError::new(
                path,
                "save cancelled; the old image is kept",
            ))
        } else {
            Ok(())
        }
    }
}

/// `DIR/.NAME.tmp-PID`, where a save of `image` is written before it replaces the image.
pub fn temporary_path(image: &Path, pid: u32) -> PathBuf {
    let name = image.file_name().unwrap_or_default().to_string_lossy();
    image.with_file_name(format!(".{name}.tmp-{pid}"))
}

/// The directory `image` lives in ("." for a bare file name).
fn directory(image: &Path) -> &Path {
    match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// A temporary file removed when dropped, unless it was renamed into place.
struct Temporary {
    path: PathBuf,
    file: File,
    kept: bool,
}

impl Temporary {
    fn create(image: &Path) -> Result<Self, ImageError> {
        let path = temporary_path(image, std::process::id());
        // One of ours, left by an earlier save of this process that could not clean up.
        let _ = fs::remove_file(&path);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            // Disk contents are the clients' data: not for other users to read.
            .mode(0o600)
            .open(&path)
            .map_err(|err| {
                ImageError::new(
                    image,
                    format!(
                        "cannot create {}: {err}; the image's directory must exist and be \
                         writable by the server (or choose another image path)",
                        path.display()
                    ),
                )
            })?;
        Ok(Self {
            path,
            file,
            kept: false,
        })
    }
}

impl Drop for Temporary {
    fn drop(&mut self) {
        if !self.kept {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Checks at start that a save will be able to create its temporary file next to `image`,
/// and removes temporary files that saves of processes no longer running left behind (a
/// crash or power cut mid-save). Returns the leftovers removed.
pub fn prepare_directory(image: &Path) -> Result<Vec<PathBuf>, ImageError> {
    drop(Temporary::create(image)?);
    let name = image.file_name().unwrap_or_default().to_string_lossy();
    let prefix = format!(".{name}.tmp-");
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(directory(image)) else {
        return Ok(removed);
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let alive = pid.parse::<u32>().is_ok_and(|pid| {
            pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists()
        });
        if !alive && fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

/// Saves `disk` to `image`, crash-safe and point-in-time consistent (see the module
/// documentation). `progress(done, total)` is called as data is copied in the first pass.
pub fn save(
    disk: &RamDisk,
    image: &Path,
    cancel: &Cancel,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Saved, ImageError> {
    let started = Instant::now();
    let tmp = Temporary::create(image)?;
    let tmp_path = tmp.path.clone();
    let write_error = |err: io::Error| {
        ImageError::new(
            image,
            format!(
                "writing {} failed: {err}; the old image is kept",
                tmp_path.display()
            ),
        )
    };
    tmp.file.set_len(disk.size()).map_err(write_error)?;
    let snapshot = disk
        .snapshot()
        .map_err(|err| ImageError::new(image, err.to_string()))?;
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    let mut writer = ChunkWriter {
        file: &tmp.file,
        size: disk.size(),
        copied: 0,
        punch: true,
    };
    let total = disk.allocated_bytes();
    for chunk in snapshot.held_chunks() {
        cancel.check(image)?;
        let copied = snapshot.copy_chunk(chunk, u64::MAX, &mut buf);
        // A fresh file reads as zero everywhere: no holes to make in the first pass.
        writer.write(copied, &buf, false).map_err(write_error)?;
        progress(writer.copied.min(total), total);
    }
    let mut passes = 1;
    while snapshot.changed_pages() > FINAL_PAGES && passes < MAX_LIVE_PASSES {
        for (chunk, pages) in snapshot.take_changed() {
            cancel.check(image)?;
            let copied = snapshot.copy_chunk(chunk, pages, &mut buf);
            writer.write(copied, &buf, true).map_err(write_error)?;
        }
        passes += 1;
    }
    cancel.check(image)?;
    let mut deferred = Deferred::default();
    let pause = snapshot
        .finish(&mut buf, |copied, data| {
            if deferred.bytes.len() < FINAL_IN_MEMORY {
                deferred.keep(copied, data, disk.size());
                Ok(())
            } else {
                writer.write(copied, data, true)
            }
        })
        .map_err(write_error)?;
    deferred.write(&mut writer, &mut buf).map_err(write_error)?;
    let copied_bytes = writer.copied;
    let data_bytes = allocated_in_file(&tmp.file).map_err(write_error)?;
    tmp.file.sync_all().map_err(write_error)?;
    replace(tmp, image)?;
    Ok(Saved {
        data_bytes,
        copied_bytes,
        passes: passes + 1,
        elapsed: started.elapsed(),
        pause,
    })
}

/// Renames the synced temporary file over `image` and syncs the directory, so the rename
/// itself survives a power cut.
fn replace(mut tmp: Temporary, image: &Path) -> Result<(), ImageError> {
    fs::rename(&tmp.path, image).map_err(|err| {
        ImageError::new(
            image,
            format!(
                "renaming {} over the image failed: {err}; the old image is kept",
                tmp.path.display()
            ),
        )
    })?;
    tmp.kept = true;
    File::open(directory(image))
        .and_then(|dir| dir.sync_all())
        .map_err(|err| {
            ImageError::new(
                image,
                format!("saved, but syncing its directory failed: {err}; a power cut now may lose the new image"),
            )
        })
}

/// Bytes of the file that are data, by `SEEK_DATA`/`SEEK_HOLE`.
fn allocated_in_file(file: &File) -> io::Result<u64> {
    let mut total = 0;
    for extent in DataExtents::new(file)? {
        let (start, end) = extent?;
        total += end - start;
    }
    Ok(total)
}

/// Writes chunk copies into the image file.
struct ChunkWriter<'a> {
    file: &'a File,
    size: u64,
    copied: u64,
    /// Whether punching holes works here; off after the filesystem refused it once.
    punch: bool,
}

impl ChunkWriter<'_> {
    /// Writes the copied pages that hold data from `data` (laid out as in the chunk); with
    /// `holes`, makes the copied pages that do not read as zero (the file may hold an earlier
    /// pass's copy of them).
    fn write(&mut self, copied: Copied, data: &[u8], holes: bool) -> io::Result<()> {
        let start = copied.chunk * CHUNK_SIZE;
        let end = (start + CHUNK_SIZE).min(self.size);
        let pages = (end - start).div_ceil(PAGE_SIZE);
        let state =
            |page: u64| (copied.pages & (1 << page) != 0).then_some(copied.held & (1 << page) != 0);
        let mut page = 0;
        while page < pages {
            let Some(held) = state(page) else {
                page += 1;
                continue;
            };
            let mut run_end = page + 1;
            while run_end < pages && state(run_end) == Some(held) {
                run_end += 1;
            }
            let from = start + page * PAGE_SIZE;
            let to = (start + run_end * PAGE_SIZE).min(end);
            if held {
                let bytes = &data[(from - start) as usize..(to - start) as usize];
                self.file.write_all_at(bytes, from)?;
                self.copied += to - from;
            } else if holes {
                self.make_hole(from, to)?;
            }
            page = run_end;
        }
        Ok(())
    }

    fn make_hole(&mut self, from: u64, to: u64) -> io::Result<()> {
        if self.punch {
            let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
            match rustix::fs::fallocate(self.file, flags, from, to - from) {
                Ok(()) => return Ok(()),
                Err(rustix::io::Errno::OPNOTSUPP) => self.punch = false,
                Err(err) => return Err(err.into()),
            }
        }
        let zeroes = vec![0u8; (to - from) as usize];
        self.file.write_all_at(&zeroes, from)
    }
}

/// Pages the final pass copied into memory, to be written once writes go on again.
#[derive(Default)]
struct Deferred {
    /// Each chunk's copy, with where its held pages start in `bytes`.
    chunks: Vec<(Copied, usize)>,
    /// The held pages, in order.
    bytes: Vec<u8>,
}

impl Deferred {
    /// Keeps the held pages of `copied` (of an export of `size` bytes) from `data`.
    fn keep(&mut self, copied: Copied, data: &[u8], size: u64) {
        self.chunks.push((copied, self.bytes.len()));
        for page in bits(copied.held) {
            let at = (page * PAGE_SIZE) as usize;
            let len = page_len(size, copied.chunk, page);
            self.bytes.extend_from_slice(&data[at..at + len]);
        }
    }

    /// Writes every kept chunk, laid out again in `buf`.
    fn write(&self, writer: &mut ChunkWriter<'_>, buf: &mut [u8]) -> io::Result<()> {
        for &(copied, mut at) in &self.chunks {
            for page in bits(copied.held) {
                let len = page_len(writer.size, copied.chunk, page);
                let to = (page * PAGE_SIZE) as usize;
                buf[to..to + len].copy_from_slice(&self.bytes[at..at + len]);
                at += len;
            }
            writer.write(copied, buf, true)?;
        }
        Ok(())
    }
}

/// Bytes of page `page` of `chunk` inside an export of `size` bytes (the last page of an
/// odd-sized export is cut short).
fn page_len(size: u64, chunk: u64, page: u64) -> usize {
    PAGE_SIZE.min(size - chunk * CHUNK_SIZE - page * PAGE_SIZE) as usize
}

/// The indexes of the bits set in `word`, lowest first.
fn bits(mut word: u64) -> impl Iterator<Item = u64> {
    std::iter::from_fn(move || {
        (word != 0).then(|| {
            let bit = u64::from(word.trailing_zeros());
            word &= word - 1;
            bit
        })
    })
}

/// The data extents of a file, `(start, end)`, by `SEEK_DATA`/`SEEK_HOLE` (a filesystem
/// without them reports the whole file as data).
struct DataExtents<'a> {
    file: &'a File,
    pos: u64,
    len: u64,
}

impl<'a> DataExtents<'a> {
    fn new(file: &'a File) -> io::Result<Self> {
        Ok(Self {
            file,
            pos: 0,
            len: file.metadata()?.len(),
        })
    }
}

impl Iterator for DataExtents<'_> {
    type Item = io::Result<(u64, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.len {
            return None;
        }
        let start = match rustix::fs::seek(self.file, SeekFrom::Data(self.pos)) {
            Ok(start) => start,
            // No data past `pos`.
            Err(rustix::io::Errno::NXIO) => return None,
            Err(err) => return Some(Err(err.into())),
        };
        let end = match rustix::fs::seek(self.file, SeekFrom::Hole(start)) {
            Ok(end) => end.min(self.len),
            Err(err) => return Some(Err(err.into())),
        };
        self.pos = end;
        Some(Ok((start, end)))
    }
}

/// Fills `disk` (empty) from `image`; see the module documentation for what is refused.
/// `progress(done, total)` is called as data is read.
pub fn load(
    disk: &RamDisk,
    image: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Loaded, ImageError> {
    const KEEP: &str = "the server does not start, so the file is not overwritten";
    let meta = match fs::metadata(image) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Loaded::Missing),
        Err(err) => {
            return Err(ImageError::new(
                image,
                format!("cannot look at it: {err}; fix its permissions or path ({KEEP})"),
            ));
        }
    };
    if !meta.is_file() {
        return Err(ImageError::new(
            image,
            format!(
                "is not a regular file but {}; an image is a plain file the size of the \
                 export: point image at a file, or remove what is there ({KEEP})",
                file_kind(&meta)
            ),
        ));
    }
    if meta.len() != disk.size() {
        let what = if meta.len() < disk.size() {
            "too short (truncated, or made for a smaller export)"
        } else {
            "too long (made for a larger export)"
        };
        return Err(ImageError::new(
            image,
            format!(
                "is {} bytes ({}) but the export is {} bytes ({}): {what}; set the export's \
                 size to {}, or move the file away to start empty ({KEEP})",
                meta.len(),
                format_size(meta.len()),
                disk.size(),
                format_size(disk.size()),
                meta.len(),
            ),
        ));
    }
    let file = File::open(image).map_err(|err| {
        ImageError::new(
            image,
            format!("cannot open it: {err}; fix its permissions ({KEEP})"),
        )
    })?;
    let read_error = |at: u64, err: io::Error| {
        ImageError::new(
            image,
            format!(
                "reading at offset {at} failed: {err}; the file may be damaged: copy what can \
                 be read elsewhere, or move it away to start empty ({KEEP})"
            ),
        )
    };
    let total = allocated_in_file(&file).map_err(|err| read_error(0, err))?;
    let mut buf = vec![0u8; LOAD_PIECE];
    let mut done = 0;
    for extent in DataExtents::new(&file).map_err(|err| read_error(0, err))? {
        let (start, end) = extent.map_err(|err| read_error(0, err))?;
        let mut pos = start;
        while pos < end {
            let len = (end - pos).min(LOAD_PIECE as u64) as usize;
            file.read_exact_at(&mut buf[..len], pos)
                .map_err(|err| read_error(pos, err))?;
            disk.write(pos, &buf[..len]).map_err(|NoSpace| {
                ImageError::new(
                    image,
                    format!(
                        "holds more data than the memory cap allows (stopped at offset {pos}); \
                         raise max-memory, or move the file away to start empty ({KEEP})"
                    ),
                )
            })?;
            pos += len as u64;
            done += len as u64;
            progress(done.min(total), total);
        }
    }
    disk.mark_saved().map_err(|err| {
        ImageError::new(image, format!("loaded, but cannot track changes: {err}"))
    })?;
    Ok(Loaded::Data(done))
}

fn file_kind(meta: &fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let kind = meta.file_type();
    if kind.is_dir() {
        "a directory"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

#[cfg(test)]
mod tests;
