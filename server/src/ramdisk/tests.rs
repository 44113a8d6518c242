use super::*;

fn read(disk: &RamDisk, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0xee; len];
    disk.read(offset, &mut out);
    out
}

fn extents(disk: &RamDisk, offset: u64, len: u64, limit: usize) -> Vec<(u64, Extent)> {
    disk.extents(offset, len).take(limit).collect()
}

#[test]
fn the_page_rule_for_writes_and_zeroing() {
    use PageChange::*;
    let data = Fill::Bytes(&[1, 0]);
    let zeroes = Fill::Bytes(&[0, 0]);
    let trim = Fill::Zeroes(ZeroMode::Release);
    let no_hole = Fill::Zeroes(ZeroMode::Allocate);
    // (held, whole, fill) -> change
    let table = [
        (false, true, data, Store),
        (true, false, data, Store),
        (false, true, zeroes, Keep),
        (false, false, zeroes, Keep),
        (true, true, zeroes, Release),
        (true, false, zeroes, ZeroPart),
        (false, true, trim, Keep),
        (true, true, trim, Release),
        (true, false, trim, ZeroPart),
        (false, true, no_hole, Store),
        (true, false, no_hole, Store),
    ];
    for (held, whole, fill, change) in table {
        assert_eq!(
            page_change(held, whole, fill),
            change,
            "{held} {whole} {fill:?}"
        );
    }
}

#[test]
fn fresh_disk_reads_zero_and_is_one_hole() {
    let disk = RamDisk::new(10 * CHUNK_SIZE + 123).unwrap();
    assert!(read(&disk, 0, 100_000).iter().all(|&b| b == 0));
    assert_eq!(
        extents(&disk, 0, disk.size(), 16),
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
        extents(&disk, 0, 4 * PAGE_SIZE, 16),
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
    disk.zero(100, 2 * CHUNK_SIZE - 200, ZeroMode::Release)
        .unwrap();
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
    disk.zero(0, PAGE_SIZE + 512, ZeroMode::Release).unwrap();
    assert_eq!(
        disk.allocated_bytes(),
        PAGE_SIZE,
        "half the page still holds data"
    );
    disk.zero(PAGE_SIZE + 512, CHUNK_SIZE, ZeroMode::Release)
        .unwrap();
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
    disk.zero(0, 2 * PAGE_SIZE, ZeroMode::Allocate).unwrap();
    assert_eq!(disk.allocated_bytes(), 2 * PAGE_SIZE);
    assert_eq!(
        extents(&disk, 0, 2 * PAGE_SIZE, 4),
        vec![(2 * PAGE_SIZE, Extent::Data)]
    );
    assert!(
        read(&disk, 0, 2 * PAGE_SIZE as usize)
            .iter()
            .all(|&b| b == 0)
    );
}

#[test]
fn odd_sized_disks_work_to_their_last_byte_and_release_their_last_page() {
    // Sizes that are not page multiples: the last page is cut short, and nothing past the
    // export's length is ever read or written (the guards would panic).
    for size in [1, 1000, 4097, CHUNK_SIZE + 1, 3 * CHUNK_SIZE - 5] {
        let disk = RamDisk::new(size).unwrap();
        let data = vec![0x5au8; size as usize];
        disk.write(0, &data).unwrap();
        assert_eq!(read(&disk, 0, size as usize), data, "size {size}");
        assert_eq!(disk.allocated_bytes(), size.div_ceil(PAGE_SIZE) * PAGE_SIZE);
        // Zero writes over the short last page, then a trim of everything: all given back.
        let last_page = (size - 1) / PAGE_SIZE * PAGE_SIZE;
        disk.write(last_page, &vec![0; (size - last_page) as usize])
            .unwrap();
        assert_eq!(
            disk.allocated_bytes(),
            last_page,
            "size {size}: the short last page was released"
        );
        disk.zero(0, size, ZeroMode::Release).unwrap();
        assert_eq!(disk.allocated_bytes(), 0, "size {size}");
        assert!(read(&disk, 0, size as usize).iter().all(|&b| b == 0));
        disk.zero(0, size, ZeroMode::Allocate).unwrap();
        assert_eq!(extents(&disk, 0, size, 4), vec![(size, Extent::Data)]);
    }
}

#[test]
fn extents_respect_the_limit_and_range() {
    let disk = RamDisk::new(CHUNK_SIZE).unwrap();
    for page in (0..64).step_by(2) {
        disk.write(page * PAGE_SIZE, &[1]).unwrap();
    }
    let all = extents(&disk, 0, CHUNK_SIZE, usize::MAX);
    assert_eq!(all.len(), 64);
    assert_eq!(extents(&disk, 0, CHUNK_SIZE, 3).len(), 3);
    assert_eq!(extents(&disk, 10, 100, 8), vec![(100, Extent::Data)]);
}

#[test]
fn a_one_extent_limit_still_covers_the_whole_first_run() {
    let disk = RamDisk::new(4 * CHUNK_SIZE).unwrap();
    disk.write(0, &[1; 3 * PAGE_SIZE as usize]).unwrap();
    assert_eq!(
        extents(&disk, 0, disk.size(), 1),
        vec![(3 * PAGE_SIZE, Extent::Data)]
    );
    let rest = disk.size() - 3 * PAGE_SIZE;
    assert_eq!(
        extents(&disk, 3 * PAGE_SIZE, rest, 1),
        vec![(rest, Extent::Hole)]
    );
}

#[test]
fn huge_sparse_disk_costs_nothing() {
    let disk = RamDisk::new(1 << 40).unwrap();
    disk.write((1 << 40) - 4096, &[9; 4096]).unwrap();
    disk.zero(0, (1 << 40) - 4096, ZeroMode::Release).unwrap();
    assert_eq!(disk.allocated_bytes(), PAGE_SIZE);
    assert_eq!(
        extents(&disk, 0, 1 << 40, 16),
        vec![((1 << 40) - 4096, Extent::Hole), (4096, Extent::Data)]
    );
}

#[test]
fn a_zeroing_runs_in_bounded_steps() {
    // One page held per GiB of a 64 GiB disk: every step changes at most ZERO_STEP_CHUNKS
    // chunks and covers at most ZERO_STEP_SPAN bytes, so a session can yield between steps.
    let disk = RamDisk::new(64 << 30).unwrap();
    for gib in 0..64u64 {
        disk.write(gib << 30, &[1; 4096]).unwrap();
    }
    let mut update = disk.start_zero(0, 64 << 30, ZeroMode::Release).unwrap();
    let mut steps = 1;
    while !update.zero_step() {
        steps += 1;
    }
    assert_eq!(steps, (64 << 30) / ZERO_STEP_SPAN);
    assert_eq!(disk.allocated_bytes(), 0);
    // With many held chunks, the chunk count ends a step first.
    disk.write(0, &vec![1; 200 * CHUNK_SIZE as usize]).unwrap();
    let mut update = disk
        .start_zero(0, 200 * CHUNK_SIZE, ZeroMode::Release)
        .unwrap();
    assert!(!update.zero_step());
    assert_eq!(
        update.remaining(),
        (200 - u64::from(ZERO_STEP_CHUNKS)) * CHUNK_SIZE
    );
}

#[test]
fn a_streamed_write_lands_piece_by_piece() {
    let disk = RamDisk::new(4 * CHUNK_SIZE).unwrap();
    let data: Vec<u8> = (0..3 * CHUNK_SIZE).map(|i| (i % 253) as u8 + 1).collect();
    let mut update = disk.start_write(100, data.len() as u64).unwrap();
    for part in data.chunks(7777) {
        update.write(part);
    }
    assert_eq!(update.remaining(), 0);
    drop(update);
    assert_eq!(read(&disk, 100, data.len()), data);
    assert_eq!(read(&disk, 0, 100), vec![0; 100]);
}

#[test]
fn resident_bytes_follow_writes_and_trims() {
    let disk = RamDisk::new(64 << 20).unwrap();
    assert_eq!(disk.resident_bytes(), 0);
    disk.write(5 << 20, &[3; 3 * PAGE_SIZE as usize]).unwrap();
    assert_eq!(disk.resident_bytes(), 3 * PAGE_SIZE);
    disk.zero(5 << 20, PAGE_SIZE, ZeroMode::Release).unwrap();
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

#[test]
#[should_panic(expected = "outside")]
fn out_of_range_access_panics_instead_of_touching_memory() {
    let disk = RamDisk::new(4097).unwrap();
    disk.write(4096, &[1, 2]).unwrap();
}

mod budgets {
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
        assert_eq!(read(&disk, CHUNK_SIZE, 10), vec![0; 10]);
        // Overwriting held pages and writing zeroes need no room.
        disk.write(0, &[9; 100]).unwrap();
        disk.write(CHUNK_SIZE, &[0; PAGE_SIZE as usize]).unwrap();
        // Trim two pages: two pages of room.
        disk.zero(0, 2 * PAGE_SIZE, ZeroMode::Release).unwrap();
        assert_eq!(budget.used_bytes(), 6 * PAGE_SIZE);
        disk.write(CHUNK_SIZE, &[1; 2 * PAGE_SIZE as usize])
            .unwrap();
        assert_eq!(disk.write(2 * CHUNK_SIZE, &[1]), Err(NoSpace));
        // NO_HOLE zeroing allocates, so it is capped too.
        assert_eq!(
            disk.zero(3 * CHUNK_SIZE, PAGE_SIZE, ZeroMode::Allocate),
            Err(NoSpace)
        );
    }

    #[test]
    fn a_streamed_write_reserves_its_whole_range_first_and_returns_what_it_did_not_use() {
        let (disk, budget) = capped(4 * CHUNK_SIZE, 8 * PAGE_SIZE);
        assert!(disk.start_write(0, 9 * PAGE_SIZE).is_err());
        let mut update = disk.start_write(0, 8 * PAGE_SIZE).unwrap();
        assert_eq!(budget.used_bytes(), 8 * PAGE_SIZE, "all of it reserved");
        update.write(&[1; PAGE_SIZE as usize]);
        update.write(&[0; 3 * PAGE_SIZE as usize]);
        // The client went away half way: the reservation is squared with what was written.
        drop(update);
        assert_eq!(budget.used_bytes(), PAGE_SIZE);
        assert_eq!(disk.allocated_bytes(), PAGE_SIZE);
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
        a.zero(0, CHUNK_SIZE, ZeroMode::Release).unwrap();
        b.write(PAGE_SIZE, &[1; 3 * PAGE_SIZE as usize]).unwrap();
        assert_eq!(budget.used_bytes(), 4 * PAGE_SIZE);
    }
}
