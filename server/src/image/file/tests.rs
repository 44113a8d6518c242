use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::*;
use crate::ramdisk::{MemoryBudget, MemoryOptions, ZeroMode};

const MIB: u64 = 1 << 20;

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "ramnbd-image-test-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// A name unique within this process (tests run on parallel threads).
fn rand_suffix() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn save_ok(disk: &RamDisk, path: &Path) -> Saved {
    save(disk, path, &Cancel::default(), &mut |_, _| {}).unwrap()
}

fn load_into(size: u64, path: &Path) -> Result<(RamDisk, Loaded), ImageError> {
    let disk = RamDisk::new(size).unwrap();
    let loaded = load(&disk, path, &mut |_, _| {})?;
    Ok((disk, loaded))
}

fn read(disk: &RamDisk, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    disk.read(offset, &mut out);
    out
}

/// Files left in `dir` besides the image.
fn others(dir: &Path, image: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p != image)
        .collect()
}

#[test]
fn a_round_trip_keeps_data_and_holes_and_the_file_is_sparse() {
    let dir = temp_dir();
    let path = dir.join("disk.img");
    let size = 1 << 30;
    let disk = RamDisk::new(size).unwrap();
    disk.write(0, &[1; 4096]).unwrap();
    disk.write(100 * MIB + 123, &[2; 10_000]).unwrap();
    disk.write(size - 4096, &[3; 4096]).unwrap();
    // Written and trimmed again: a hole.
    disk.write(500 * MIB, &[4; 65536]).unwrap();
    disk.zero(500 * MIB, 65536, ZeroMode::Release).unwrap();
    let saved = save_ok(&disk, &path);
    assert_eq!(saved.data_bytes, disk.allocated_bytes());

    let meta = fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), size);
    assert_eq!(meta.mode() & 0o777, 0o600, "disk contents are private");
    // 1 + 4 (10 000 bytes across page boundaries) + 1 pages of data; filesystems may round
    // extents up a little, never to anything near the 1 GiB size.
    assert!(
        meta.blocks() * 512 <= 1 << 20,
        "{} bytes allocated",
        meta.blocks() * 512
    );

    let (copy, loaded) = load_into(size, &path).unwrap();
    assert_eq!(loaded, Loaded::Data(saved.data_bytes));
    assert_eq!(copy.allocated_bytes(), disk.allocated_bytes());
    for (offset, len) in [
        (0, 8192),
        (100 * MIB, 20_000),
        (size - 8192, 8192),
        (500 * MIB, 65536),
    ] {
        assert_eq!(
            read(&copy, offset, len),
            read(&disk, offset, len),
            "at {offset}"
        );
    }
    assert_eq!(
        others(&dir, &path),
        Vec::<PathBuf>::new(),
        "no temporary file left"
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_odd_sized_export_round_trips_to_its_last_byte() {
    let dir = temp_dir();
    let path = dir.join("odd.img");
    let disk = RamDisk::new(4097 + CHUNK_SIZE).unwrap();
    disk.write(CHUNK_SIZE + 4096, &[7]).unwrap();
    disk.write(5, &[8; 3]).unwrap();
    save_ok(&disk, &path);
    assert_eq!(fs::metadata(&path).unwrap().len(), 4097 + CHUNK_SIZE);
    let (copy, _) = load_into(4097 + CHUNK_SIZE, &path).unwrap();
    assert_eq!(read(&copy, CHUNK_SIZE + 4096, 1), [7]);
    assert_eq!(read(&copy, 0, 8), [0, 0, 0, 0, 0, 8, 8, 8]);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_missing_image_means_an_empty_start() {
    let dir = temp_dir();
    let (disk, loaded) = load_into(MIB, &dir.join("none.img")).unwrap();
    assert_eq!(loaded, Loaded::Missing);
    assert_eq!(disk.allocated_bytes(), 0);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_images_are_refused_naming_the_file_and_the_fix() {
    let dir = temp_dir();
    let short = dir.join("short.img");
    fs::write(&short, [1; 4096]).unwrap();
    let err = load_into(MIB, &short).unwrap_err().to_string();
    for part in [
        short.to_str().unwrap(),
        "4096 bytes",
        "1048576 bytes",
        "too short",
        "move the file away",
    ] {
        assert!(err.contains(part), "{part:?} missing in: {err}");
    }
    let err = load_into(1024, &short).unwrap_err().to_string();
    assert!(
        err.contains("too long") && err.contains("set the export's size to 4096"),
        "{err}"
    );

    let err = load_into(MIB, &dir).unwrap_err().to_string();
    assert!(err.contains("not a regular file but a directory"), "{err}");

    let fifo = dir.join("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let err = load_into(MIB, &fifo).unwrap_err().to_string();
    assert!(
        err.contains("a FIFO") && err.contains(fifo.to_str().unwrap()),
        "{err}"
    );

    // Root reads whatever the mode says; the check means something for other users only.
    if !rustix::process::geteuid().is_root() {
        let locked = dir.join("locked.img");
        fs::write(&locked, vec![0; MIB as usize]).unwrap();
        fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
        let err = load_into(MIB, &locked).unwrap_err().to_string();
        assert!(
            err.contains("cannot open it") && err.contains("permissions"),
            "{err}"
        );
    }
    // Every refused file is as it was.
    assert_eq!(fs::read(&short).unwrap(), [1; 4096]);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_image_with_more_data_than_the_cap_is_refused() {
    let dir = temp_dir();
    let path = dir.join("big.img");
    let disk = RamDisk::new(4 * MIB).unwrap();
    disk.write(0, &vec![5; 2 * MIB as usize]).unwrap();
    save_ok(&disk, &path);
    let options = MemoryOptions {
        budgets: vec![Arc::new(MemoryBudget::new(MIB))],
        ..MemoryOptions::default()
    };
    let small = RamDisk::with_options(4 * MIB, &options).unwrap();
    let err = load(&small, &path, &mut |_, _| {}).unwrap_err().to_string();
    assert!(
        err.contains("memory cap") && err.contains("max-memory"),
        "{err}"
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_save_that_fails_half_way_keeps_the_old_image() {
    let dir = temp_dir();
    let path = dir.join("disk.img");
    let disk = RamDisk::new(64 * MIB).unwrap();
    disk.write(0, &vec![1; 8 * MIB as usize]).unwrap();
    save_ok(&disk, &path);
    let old = fs::read(&path).unwrap();

    disk.write(0, &vec![2; 64 * MIB as usize]).unwrap();
    let cancel = Cancel::default();
    let calls = AtomicBool::new(false);
    let err = save(&disk, &path, &cancel, &mut |done, _| {
        // Some of the new data is in the temporary file when the save fails.
        if done >= 16 * MIB {
            calls.store(true, Ordering::Relaxed);
            cancel.cancel();
        }
    })
    .unwrap_err();
    assert!(calls.load(Ordering::Relaxed));
    assert!(err.to_string().contains("the old image is kept"), "{err}");
    assert!(fs::read(&path).unwrap() == old, "the old image changed");
    assert_eq!(
        others(&dir, &path),
        Vec::<PathBuf>::new(),
        "the temporary file is removed"
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_save_into_a_missing_directory_fails_clearly() {
    let dir = temp_dir();
    let path = dir.join("no/such/dir/disk.img");
    let disk = RamDisk::new(MIB).unwrap();
    let err = save(&disk, &path, &Cancel::default(), &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("directory must exist"), "{err}");
    let err = prepare_directory(&path).unwrap_err().to_string();
    assert!(err.contains("directory must exist"), "{err}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn leftovers_of_dead_saves_are_removed_and_live_ones_kept() {
    let dir = temp_dir();
    let path = dir.join("disk.img");
    // Beyond the largest pid Linux allows: no such process.
    let dead = temporary_path(&path, 1 << 23);
    let live = temporary_path(&path, 1);
    let other = dir.join(".other.img.tmp-12345678");
    for file in [&dead, &live, &other] {
        fs::write(file, b"partial").unwrap();
    }
    assert_eq!(
        prepare_directory(&path).unwrap(),
        std::slice::from_ref(&dead)
    );
    assert!(!dead.exists() && live.exists() && other.exists());
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_chunk_copied_again_loses_the_pages_it_no_longer_holds() {
    let dir = temp_dir();
    let path = dir.join("holes.img");
    let file = File::create(&path).unwrap();
    file.set_len(2 * CHUNK_SIZE).unwrap();
    let mut writer = ChunkWriter {
        file: &file,
        size: 2 * CHUNK_SIZE,
        copied: 0,
        punch: true,
    };
    let data = vec![9; CHUNK_SIZE as usize];
    let all = Copied {
        chunk: 1,
        pages: u64::MAX,
        held: u64::MAX,
    };
    writer.write(all, &data, false).unwrap();
    // Copied again, now holding its first and last page only.
    let again = Copied {
        held: 1 | 1 << 63,
        ..all
    };
    writer.write(again, &data, true).unwrap();
    // Page 1 changed back to data, page 2 not copied: only page 1 is written.
    let page_one = Copied {
        pages: 0b110,
        held: 0b010,
        ..all
    };
    writer.write(page_one, &data, true).unwrap();
    let bytes = fs::read(&path).unwrap();
    let chunk = &bytes[CHUNK_SIZE as usize..];
    let page = PAGE_SIZE as usize;
    assert!(chunk[..2 * page].iter().all(|&b| b == 9));
    assert!(chunk[2 * page..chunk.len() - page].iter().all(|&b| b == 0));
    assert!(chunk[chunk.len() - page..].iter().all(|&b| b == 9));
    assert_eq!(
        allocated_in_file(&file).unwrap(),
        3 * PAGE_SIZE,
        "the hole was punched"
    );
    fs::remove_dir_all(dir).unwrap();
}

/// A writer rewrites blocks 0..N in order, each carrying its sequence number, while the
/// disk is saved: the image must be the disk as it was after one write, so every block holds
/// the last sequence number written to it up to that write.
#[test]
fn a_save_during_writes_is_the_disk_at_one_moment() {
    const BLOCKS: u64 = 8192;
    const BLOCK: u64 = 4096;
    const BULK: u64 = 64 * MIB;
    let dir = temp_dir();
    let path = dir.join("seq.img");
    let disk = RamDisk::new(BULK + BLOCKS * BLOCK).unwrap();
    // Data before the blocks, so that the live pass takes a while to reach them.
    disk.write(0, &vec![1; BULK as usize]).unwrap();
    let written = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let saved = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut seq: u64 = 1;
            let mut block = vec![0u8; BLOCK as usize];
            while !stop.load(Ordering::Relaxed) {
                let index = seq % BLOCKS;
                block[..8].copy_from_slice(&seq.to_le_bytes());
                block[8..16].copy_from_slice(&index.to_le_bytes());
                disk.write(BULK + index * BLOCK, &block).unwrap();
                written.store(seq, Ordering::Relaxed);
                seq += 1;
            }
        });
        while written.load(Ordering::Relaxed) < BLOCKS {
            std::thread::yield_now();
        }
        let before = written.load(Ordering::Relaxed);
        let saved = save_ok(&disk, &path);
        let during = written.load(Ordering::Relaxed) - before;
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert!(during > BLOCKS / 8, "only {during} writes during the save");
        saved
    });
    let (copy, _) = load_into(disk.size(), &path).unwrap();
    let seqs: Vec<u64> = (0..BLOCKS)
        .map(|i| {
            let bytes = read(&copy, BULK + i * BLOCK, 16);
            let seq = u64::from_le_bytes(bytes[..8].try_into().unwrap());
            if seq != 0 {
                let index = u64::from_le_bytes(bytes[8..].try_into().unwrap());
                assert_eq!(index, i, "block {i} holds another block's data");
            }
            seq
        })
        .collect();
    let last = *seqs.iter().max().unwrap();
    for (i, &seq) in seqs.iter().enumerate() {
        // The state after write `last`: the latest sequence number up to it for this block
        // (block 0's first is BLOCKS: numbers start at 1).
        let expected = last - (last + BLOCKS - i as u64) % BLOCKS;
        assert_eq!(seq, expected, "block {i}: not the disk after write {last}");
    }
    assert!(saved.passes >= 2, "{saved:?}");
    fs::remove_dir_all(dir).unwrap();
}

/// Writes that land during the first pass reach the image through the final pass, the last
/// page of an odd-sized export included.
#[test]
fn writes_during_the_first_pass_are_in_the_image() {
    let dir = temp_dir();
    let path = dir.join("late.img");
    let size = 3 * CHUNK_SIZE + 100;
    let disk = RamDisk::new(size).unwrap();
    disk.write(0, &[1; 4096]).unwrap();
    disk.write(CHUNK_SIZE, &[2; 4096]).unwrap();
    let mut wrote = false;
    let saved = save(&disk, &path, &Cancel::default(), &mut |_, _| {
        if !wrote {
            wrote = true;
            disk.write(5, &[3; 10]).unwrap();
            disk.write(2 * CHUNK_SIZE + 8192, &[4; 4096]).unwrap();
            disk.write(size - 50, &[5; 50]).unwrap();
            disk.zero(CHUNK_SIZE, 4096, ZeroMode::Release).unwrap();
        }
    })
    .unwrap();
    assert!(saved.pause.pages >= 4, "{saved:?}");
    let (copy, _) = load_into(size, &path).unwrap();
    assert_eq!(read(&copy, 0, size as usize), read(&disk, 0, size as usize));
    assert_eq!(read(&copy, size - 50, 50), [5; 50]);
    assert_eq!(
        read(&copy, CHUNK_SIZE, 4096),
        [0; 4096],
        "the zeroed page is a hole"
    );
    fs::remove_dir_all(dir).unwrap();
}
