use super::*;

fn read(disk: &RamDisk, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0xee; len];
    disk.read(offset, &mut out);
    out
}

fn extents(disk: &RamDisk, offset: u64, len: u64, limit: usize) -> Vec<(u64, Extent)> {
    disk.extents(offset, len).take(limit).collect()
}

fn new_disk(backing: BackingKind, size: u64) -> io::Result<RamDisk> {
    let options = MemoryOptions {
        backing,
        name: "test".into(),
        ..Default::default()
    };
    RamDisk::with_options(size, &options)
}

/// Runs each named test, a `fn(BackingKind)`, once per backing: `backing_tests!(module::path;
/// name, ...)` makes `anonymous::name` and `memfd::name`.
macro_rules! backing_tests {
    ($($name:ident),* $(,)?) => {
        mod anonymous {
            $(#[test] fn $name() { super::$name(super::BackingKind::Anonymous) })*
        }
        mod memfd {
            $(#[test] fn $name() { super::$name(super::BackingKind::Memfd) })*
        }
    };
}

backing_tests!(
    fresh_disk_reads_zero_and_is_one_hole,
    unaligned_write_reads_back_across_chunks,
    zero_pages_in_a_write_are_not_allocated,
    zero_with_release_frees_whole_pages_and_zeroes_edges,
    unaligned_trims_that_zero_a_page_between_them_release_it,
    zero_without_release_keeps_pages_allocated,
    odd_sized_disks_work_to_their_last_byte_and_release_their_last_page,
    extents_respect_the_limit_and_range,
    a_one_extent_limit_still_covers_the_whole_first_run,
    huge_sparse_disk_costs_nothing,
    a_zeroing_runs_in_bounded_steps,
    a_streamed_write_lands_piece_by_piece,
    a_received_write_lands_in_the_store_and_keeps_no_zero_page,
    a_page_received_in_parts_follows_the_page_rule,
    data_sent_straight_to_a_socket_read_back_and_holes_take_no_ram,
    resident_bytes_follow_writes_and_trims,
    budgets_writes_fail_at_the_cap_and_trim_makes_room,
    budgets_a_streamed_write_reserves_its_whole_range_first,
    budgets_a_shared_budget_caps_several_disks,
    populate_makes_pages_resident_without_data_or_bits,
    a_populated_fill_holds_exactly_its_data_pages,
    a_populated_fill_holds_exactly_its_data_pages_mlocked,
    a_populated_fill_that_hits_the_cap_populates_nothing,
);

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

fn fresh_disk_reads_zero_and_is_one_hole(kind: BackingKind) {
    let disk = new_disk(kind, 10 * CHUNK_SIZE + 123).unwrap();
    assert!(read(&disk, 0, 100_000).iter().all(|&b| b == 0));
    assert_eq!(
        extents(&disk, 0, disk.size(), 16),
        vec![(disk.size(), Extent::Hole)]
    );
    assert_eq!(disk.allocated_bytes(), 0);
}

fn unaligned_write_reads_back_across_chunks(kind: BackingKind) {
    let disk = new_disk(kind, 4 * CHUNK_SIZE).unwrap();
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

fn zero_pages_in_a_write_are_not_allocated(kind: BackingKind) {
    let disk = new_disk(kind, CHUNK_SIZE).unwrap();
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

fn zero_with_release_frees_whole_pages_and_zeroes_edges(kind: BackingKind) {
    let disk = new_disk(kind, 3 * CHUNK_SIZE).unwrap();
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

fn unaligned_trims_that_zero_a_page_between_them_release_it(kind: BackingKind) {
    let disk = new_disk(kind, 2 * CHUNK_SIZE).unwrap();
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

fn zero_without_release_keeps_pages_allocated(kind: BackingKind) {
    let disk = new_disk(kind, CHUNK_SIZE).unwrap();
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

fn odd_sized_disks_work_to_their_last_byte_and_release_their_last_page(kind: BackingKind) {
    // Sizes that are not page multiples: the last page is cut short, and nothing past the
    // export's length is ever read or written (the guards would panic).
    for size in [1, 1000, 4097, CHUNK_SIZE + 1, 3 * CHUNK_SIZE - 5] {
        let disk = new_disk(kind, size).unwrap();
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

fn extents_respect_the_limit_and_range(kind: BackingKind) {
    let disk = new_disk(kind, CHUNK_SIZE).unwrap();
    for page in (0..64).step_by(2) {
        disk.write(page * PAGE_SIZE, &[1]).unwrap();
    }
    let all = extents(&disk, 0, CHUNK_SIZE, usize::MAX);
    assert_eq!(all.len(), 64);
    assert_eq!(extents(&disk, 0, CHUNK_SIZE, 3).len(), 3);
    assert_eq!(extents(&disk, 10, 100, 8), vec![(100, Extent::Data)]);
}

fn a_one_extent_limit_still_covers_the_whole_first_run(kind: BackingKind) {
    let disk = new_disk(kind, 4 * CHUNK_SIZE).unwrap();
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

fn huge_sparse_disk_costs_nothing(kind: BackingKind) {
    let disk = new_disk(kind, 1 << 40).unwrap();
    disk.write((1 << 40) - 4096, &[9; 4096]).unwrap();
    disk.zero(0, (1 << 40) - 4096, ZeroMode::Release).unwrap();
    assert_eq!(disk.allocated_bytes(), PAGE_SIZE);
    assert_eq!(
        extents(&disk, 0, 1 << 40, 16),
        vec![((1 << 40) - 4096, Extent::Hole), (4096, Extent::Data)]
    );
}

fn a_zeroing_runs_in_bounded_steps(kind: BackingKind) {
    // One page held per GiB of a 64 GiB disk: every step changes at most ZERO_STEP_CHUNKS
    // chunks and covers at most ZERO_STEP_SPAN bytes, so a session can yield between steps.
    let disk = new_disk(kind, 64 << 30).unwrap();
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

fn a_streamed_write_lands_piece_by_piece(kind: BackingKind) {
    let disk = new_disk(kind, 4 * CHUNK_SIZE).unwrap();
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

/// Receives all of `update`'s range from `socket`, polling while nothing is waiting.
fn receive_all(update: &mut Update<'_>, socket: &std::os::unix::net::UnixStream) {
    use std::os::fd::AsFd;
    while update.remaining() > 0 {
        match update.receive(socket.as_fd()) {
            Ok(Received { bytes: 0, .. }) => panic!("the peer closed the stream early"),
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
            Err(err) => panic!("receive failed: {err}"),
        }
    }
}

fn a_received_write_lands_in_the_store_and_keeps_no_zero_page(kind: BackingKind) {
    use std::io::Write;
    let (disk, budget) = capped(kind, 4 * CHUNK_SIZE, 4 * CHUNK_SIZE);
    // Pages of data and of zeroes, unaligned, across three chunks: page 2 of the range is
    // all zero, and so are the last 20 whole pages.
    let len = 3 * CHUNK_SIZE as usize - 300;
    let mut data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
    let zero_page = 2 * PAGE_SIZE as usize - 100..3 * PAGE_SIZE as usize - 100;
    data[zero_page].fill(0);
    let tail = len - 20 * PAGE_SIZE as usize - 200;
    data[tail..].fill(0);
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let sender = {
        let data = data.clone();
        std::thread::spawn(move || (&theirs).write_all(&data).unwrap())
    };
    let mut update = disk.start_write(100, len as u64).unwrap();
    receive_all(&mut update, &ours);
    drop(update);
    sender.join().unwrap();
    assert_eq!(read(&disk, 100, len), data);
    assert_eq!(read(&disk, 0, 100), vec![0; 100]);
    // Held: every page the range touches but those that read as zero: the zero page, and the
    // zero tail's pages from its first whole one to the end (the last, partly covered, page
    // was a hole and got only zeroes).
    let touched = (100 + len as u64).div_ceil(PAGE_SIZE);
    let zero_pages = 1 + (touched - (100 + tail as u64).div_ceil(PAGE_SIZE));
    assert_eq!(disk.allocated_bytes(), (touched - zero_pages) * PAGE_SIZE);
    assert_eq!(
        budget.used_bytes(),
        disk.allocated_bytes(),
        "the cap counts what is held"
    );
    assert_eq!(disk.resident_bytes(), disk.allocated_bytes());
    assert_eq!(
        extents(&disk, 2 * PAGE_SIZE, PAGE_SIZE, 8),
        vec![(PAGE_SIZE, Extent::Hole)]
    );
}

fn a_page_received_in_parts_follows_the_page_rule(kind: BackingKind) {
    use std::io::Write;
    use std::os::fd::AsFd;
    let disk = new_disk(kind, CHUNK_SIZE).unwrap();
    let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let half = PAGE_SIZE as usize / 2;
    // Nothing waiting: WouldBlock, and nothing changes.
    let mut update = disk.start_write(0, PAGE_SIZE).unwrap();
    let nothing = update.receive(ours.as_fd()).unwrap_err();
    assert_eq!(nothing.kind(), io::ErrorKind::WouldBlock);
    // Zeroes into a hole, in two parts: held while the page's part arrives, not kept after.
    theirs.write_all(&vec![0; half]).unwrap();
    let got = update.receive(ours.as_fd()).unwrap();
    assert_eq!(
        got,
        Received {
            bytes: half,
            drained: true
        }
    );
    theirs.write_all(&vec![0; half]).unwrap();
    receive_all(&mut update, &ours);
    drop(update);
    assert_eq!(disk.allocated_bytes(), 0);
    // A held page whose second half is received as zeroes keeps its first half.
    disk.write(PAGE_SIZE, &vec![5; half]).unwrap();
    let mut update = disk
        .start_write(PAGE_SIZE + half as u64, half as u64)
        .unwrap();
    theirs.write_all(&vec![0; half]).unwrap();
    receive_all(&mut update, &ours);
    drop(update);
    assert_eq!(disk.allocated_bytes(), PAGE_SIZE);
    assert_eq!(read(&disk, PAGE_SIZE, half), vec![5; half]);
    // A held page received whole as zeroes is given back.
    let mut update = disk.start_write(PAGE_SIZE, PAGE_SIZE).unwrap();
    theirs.write_all(&vec![0; PAGE_SIZE as usize]).unwrap();
    receive_all(&mut update, &ours);
    drop(update);
    assert_eq!(disk.allocated_bytes(), 0);
    assert_eq!(disk.resident_bytes(), 0);
    // The peer closes: 0 bytes. A descriptor that is not a socket: an error, nothing written.
    drop(theirs);
    let mut update = disk.start_write(0, 10).unwrap();
    assert_eq!(update.receive(ours.as_fd()).unwrap().bytes, 0);
    let file = tempfile_like();
    assert!(update.receive(file.as_fd()).is_err());
    assert_eq!(update.remaining(), 10);
    drop(update);
    assert_eq!(disk.allocated_bytes(), 0);
}

fn data_sent_straight_to_a_socket_read_back_and_holes_take_no_ram(kind: BackingKind) {
    use std::io::Read;
    use std::os::fd::AsFd;
    let disk = new_disk(kind, 4 * CHUNK_SIZE).unwrap();
    // Data in chunk 0's pages 1..3 and unaligned in chunk 2; holes everywhere else.
    let a: Vec<u8> = (0..2 * PAGE_SIZE as usize)
        .map(|i| (i % 249) as u8 + 1)
        .collect();
    disk.write(PAGE_SIZE, &a).unwrap();
    disk.write(2 * CHUNK_SIZE + 77, &[9; 5000]).unwrap();
    let held = disk.resident_bytes();
    let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let (offset, len) = (100, 3 * CHUNK_SIZE);
    let expected = read(&disk, offset, len as usize);
    let reader = std::thread::spawn(move || {
        let mut got = vec![0; len as usize];
        theirs.read_exact(&mut got).unwrap();
        (got, theirs)
    });
    let mut sent = 0;
    while sent < len {
        match disk.send(offset + sent, len - sent, ours.as_fd()) {
            Ok(n) => sent += n as u64,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
            Err(err) => panic!("send failed: {err}"),
        }
    }
    let (got, theirs) = reader.join().unwrap();
    assert!(got == expected, "the bytes sent differ from the bytes read");
    assert_eq!(disk.resident_bytes(), held, "sending holes took RAM");
    // A full socket takes part, then nothing: WouldBlock.
    let mut took = 0;
    let full = loop {
        match disk.send(0, CHUNK_SIZE, ours.as_fd()) {
            Ok(n) => {
                assert!(n as u64 <= CHUNK_SIZE);
                took += n;
            }
            Err(err) => break err,
        }
    };
    assert_eq!(full.kind(), io::ErrorKind::WouldBlock);
    assert!(took > 0);
    // The peer gone: an error (EPIPE), never a signal.
    drop(theirs);
    assert!(disk.send(0, 10, ours.as_fd()).is_err());
}

/// A descriptor that is not a socket.
fn tempfile_like() -> std::fs::File {
    std::fs::File::open("/dev/zero").unwrap()
}

fn resident_bytes_follow_writes_and_trims(kind: BackingKind) {
    let disk = new_disk(kind, 64 << 20).unwrap();
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

// Memory caps.

fn capped(kind: BackingKind, size: u64, cap: u64) -> (RamDisk, Arc<MemoryBudget>) {
    let budget = Arc::new(MemoryBudget::new(cap));
    let options = MemoryOptions {
        budgets: vec![Arc::clone(&budget)],
        backing: kind,
        ..Default::default()
    };
    (RamDisk::with_options(size, &options).unwrap(), budget)
}

fn budgets_writes_fail_at_the_cap_and_trim_makes_room(kind: BackingKind) {
    let (disk, budget) = capped(kind, 4 * CHUNK_SIZE, 8 * PAGE_SIZE);
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

fn budgets_a_streamed_write_reserves_its_whole_range_first(kind: BackingKind) {
    let (disk, budget) = capped(kind, 4 * CHUNK_SIZE, 8 * PAGE_SIZE);
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

fn budgets_a_shared_budget_caps_several_disks(kind: BackingKind) {
    let budget = Arc::new(MemoryBudget::new(4 * PAGE_SIZE));
    let options = MemoryOptions {
        budgets: vec![Arc::clone(&budget)],
        backing: kind,
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

// The memfd backing: hole punching, policies and adoption.

/// Bytes of RAM the disk's memfd really holds (`st_blocks`).
fn memfd_bytes(disk: &RamDisk) -> u64 {
    let fd = disk.backing_fd().expect("a memfd");
    rustix::fs::fstat(fd).unwrap().st_blocks as u64 * 512
}

fn memfd_options(budgets: Vec<Arc<MemoryBudget>>) -> MemoryOptions {
    MemoryOptions {
        budgets,
        backing: BackingKind::Memfd,
        name: "test".into(),
        ..Default::default()
    }
}

/// A duplicate of the disk's memfd, as a service manager's store would keep it.
fn keep_fd(disk: &RamDisk) -> OwnedFd {
    disk.backing_fd().unwrap().try_clone_to_owned().unwrap()
}

#[test]
fn only_a_memfd_disk_has_a_descriptor() {
    assert!(RamDisk::new(CHUNK_SIZE).unwrap().backing_fd().is_none());
    assert!(
        new_disk(BackingKind::Memfd, CHUNK_SIZE)
            .unwrap()
            .backing_fd()
            .is_some()
    );
}

#[test]
fn trimming_a_memfd_disk_punches_holes_that_free_its_ram() {
    let disk = new_disk(BackingKind::Memfd, 4 << 20).unwrap();
    assert_eq!(memfd_bytes(&disk), 0, "a new memfd holds no RAM");
    disk.write(0, &vec![0x77; 2 << 20]).unwrap();
    assert_eq!(memfd_bytes(&disk), 2 << 20);
    disk.zero(100, (2 << 20) - 200, ZeroMode::Release).unwrap();
    assert_eq!(
        memfd_bytes(&disk),
        2 * PAGE_SIZE,
        "only the edge pages stay"
    );
    disk.write(PAGE_SIZE * 9, &[0; PAGE_SIZE as usize]).unwrap();
    disk.zero(0, 4 << 20, ZeroMode::Release).unwrap();
    assert_eq!(memfd_bytes(&disk), 0);
    assert_eq!(disk.allocated_bytes(), 0);
}

#[test]
fn an_mlocked_memfd_disk_still_gives_trimmed_pages_back() {
    // Small enough for the default RLIMIT_MEMLOCK of 8 MiB.
    let options = MemoryOptions {
        mlock: true,
        ..memfd_options(Vec::new())
    };
    let disk = RamDisk::with_options(CHUNK_SIZE, &options).unwrap();
    disk.write(0, &[1; 8 * PAGE_SIZE as usize]).unwrap();
    assert_eq!(memfd_bytes(&disk), 8 * PAGE_SIZE);
    disk.zero(0, 6 * PAGE_SIZE, ZeroMode::Release).unwrap();
    assert_eq!(memfd_bytes(&disk), 2 * PAGE_SIZE);
    assert_eq!(disk.resident_bytes(), 2 * PAGE_SIZE);
    // Trimmed pages can be written again, and are locked again as they fault in.
    disk.write(0, &[2; PAGE_SIZE as usize]).unwrap();
    assert_eq!(read(&disk, 0, 4), vec![2; 4]);
    assert_eq!(memfd_bytes(&disk), 3 * PAGE_SIZE);
}

#[test]
fn hugepages_on_a_memfd_follow_the_shmem_setting() {
    let setting = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled").ok();
    let off = setting
        .as_deref()
        .is_none_or(|s| s.contains("[never]") || s.contains("[deny]"));
    let options = MemoryOptions {
        hugepages: true,
        ..memfd_options(Vec::new())
    };
    let result = RamDisk::with_options(4 << 20, &options);
    // Per-size settings (Linux 6.11+) may allow huge pages even when the global one is off.
    let per_size_on = std::fs::read_dir("/sys/kernel/mm/transparent_hugepage")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("hugepages-"))
        .filter_map(|e| std::fs::read_to_string(e.path().join("shmem_enabled")).ok())
        .any(|s| s.contains("[always]") || s.contains("[advise]") || s.contains("[within_size]"));
    if off && !per_size_on {
        let err = result.unwrap_err().to_string();
        assert!(
            err.contains("shmem_enabled") && err.contains("advise"),
            "{err}"
        );
    } else {
        result.unwrap();
    }
}

#[test]
fn a_memfd_name_is_cut_to_the_kernel_limit() {
    // 300 three-byte characters and a NUL: cut at a character boundary, NUL left out.
    let name = format!("{}\0x", "€".repeat(300));
    let options = MemoryOptions {
        name,
        ..memfd_options(Vec::new())
    };
    let disk = RamDisk::with_options(PAGE_SIZE, &options).unwrap();
    let fd = disk.backing_fd().unwrap();
    let link = std::fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&fd)
    ))
    .unwrap();
    let link = link.to_string_lossy();
    assert!(link.starts_with("/memfd:ramnbd:€€"), "{link}");
    assert!(link.len() < 260, "{} bytes", link.len());
}

#[test]
fn an_adopted_memfd_has_the_same_bytes_and_extents() {
    for size in [4097, 3 * CHUNK_SIZE + 5, 64 << 20] {
        let disk = new_disk(BackingKind::Memfd, size).unwrap();
        // Data at odd offsets and lengths, a page of written zeroes (NO_HOLE), holes between,
        // and the short last page.
        let spots: &[(u64, u64)] = if size < 3 * PAGE_SIZE {
            &[(size - 1, 1)] // only the short last page: the first stays a hole
        } else {
            &[(17, 5000), (3 * PAGE_SIZE - 1, 2), (size - 3, 3)]
        };
        for &(at, len) in spots {
            let data: Vec<u8> = (0..len).map(|i| (i % 199) as u8 + 1).collect();
            disk.write(at, &data).unwrap();
        }
        if size > 8 * PAGE_SIZE {
            disk.zero(6 * PAGE_SIZE, PAGE_SIZE, ZeroMode::Allocate)
                .unwrap();
        }
        let before_bytes = read(&disk, 0, size as usize);
        let before_extents = extents(&disk, 0, size, usize::MAX);
        let before_allocated = disk.allocated_bytes();
        let fd = keep_fd(&disk);
        drop(disk);

        let disk = RamDisk::adopt(fd, size, &memfd_options(Vec::new())).unwrap();
        assert!(
            read(&disk, 0, size as usize) == before_bytes,
            "size {size}: bytes"
        );
        assert_eq!(
            extents(&disk, 0, size, usize::MAX),
            before_extents,
            "size {size}"
        );
        assert_eq!(disk.allocated_bytes(), before_allocated, "size {size}");
        assert!(before_extents.len() > 1, "size {size}: holes and data both");
        // The adopted disk works as a disk: trims punch holes in the same file.
        disk.zero(0, size, ZeroMode::Release).unwrap();
        assert_eq!(memfd_bytes(&disk), 0);
    }
}

#[test]
fn adoption_refuses_a_file_of_another_size() {
    let disk = new_disk(BackingKind::Memfd, 3 * PAGE_SIZE).unwrap();
    let fd = keep_fd(&disk);
    let err = RamDisk::adopt(fd, 4 * PAGE_SIZE + 1, &memfd_options(Vec::new()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("12288 bytes") && err.contains("16385 bytes") && err.contains("20480"),
        "{err}"
    );
    // A size that rounds to the same pages is the same disk.
    RamDisk::adopt(
        keep_fd(&disk),
        3 * PAGE_SIZE - 7,
        &memfd_options(Vec::new()),
    )
    .unwrap();
}

#[test]
fn adoption_refuses_what_is_not_a_sealable_file() {
    let (socket, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let err = RamDisk::adopt(socket.into(), PAGE_SIZE, &memfd_options(Vec::new())).unwrap_err();
    assert!(err.to_string().contains("not a memfd"), "{err}");
    // A memfd created without MFD_ALLOW_SEALING could be shrunk under the mapping.
    let fd = rustix::fs::memfd_create("unsealable", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, PAGE_SIZE).unwrap();
    let err = RamDisk::adopt(fd, PAGE_SIZE, &memfd_options(Vec::new())).unwrap_err();
    assert!(err.to_string().contains("sealed"), "{err}");
}

#[test]
fn adoption_charges_the_caps_and_refuses_data_over_them() {
    let disk = new_disk(BackingKind::Memfd, 4 * CHUNK_SIZE).unwrap();
    disk.write(CHUNK_SIZE, &[3; 5 * PAGE_SIZE as usize])
        .unwrap();
    let fd = keep_fd(&disk);
    drop(disk);
    let small = Arc::new(MemoryBudget::new(4 * PAGE_SIZE));
    let err = RamDisk::adopt(
        fd.try_clone().unwrap(),
        4 * CHUNK_SIZE,
        &memfd_options(vec![Arc::clone(&small)]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("20480 bytes") && err.contains("of 16384 bytes"),
        "{err}"
    );
    assert_eq!(small.used_bytes(), 0, "a refused adoption takes nothing");
    let fitting = Arc::new(MemoryBudget::new(5 * PAGE_SIZE));
    let disk = RamDisk::adopt(
        fd,
        4 * CHUNK_SIZE,
        &memfd_options(vec![Arc::clone(&fitting)]),
    )
    .unwrap();
    assert_eq!(fitting.used_bytes(), 5 * PAGE_SIZE);
    assert_eq!(disk.write(0, &[1]), Err(NoSpace), "the cap is full");
    assert_eq!(
        read(&disk, CHUNK_SIZE, 2),
        vec![3, 3],
        "the data was left alone"
    );
    drop(disk);
    assert_eq!(
        fitting.used_bytes(),
        0,
        "a dropped disk gives its pages back to the cap"
    );
}

// Populating holes ahead of a write (`MADV_POPULATE_WRITE`, `populate_runs`).

/// Pages of `disk`'s mapping the kernel holds, whatever the allocation map says.
fn mapped_resident_pages(disk: &RamDisk) -> u64 {
    let mapping = disk.chunks.backing().map();
    os::resident_pages(mapping, 0..mapping.len(), &mut Vec::new())
}

fn populate_makes_pages_resident_without_data_or_bits(kind: BackingKind) {
    let disk = new_disk(kind, CHUNK_SIZE).unwrap();
    assert_eq!(mapped_resident_pages(&disk), 0);
    let mut guard = disk.chunks.write(0);
    // Both test kernels and the host have MADV_POPULATE_WRITE (Linux >= 5.14).
    assert!(guard.populate(3 * PAGE_SIZE..8 * PAGE_SIZE));
    assert_eq!(guard.allocated(), 0, "populating sets no bit");
    drop(guard);
    assert_eq!(mapped_resident_pages(&disk), 5);
    assert_eq!(
        read(&disk, 0, CHUNK_SIZE as usize),
        vec![0; CHUNK_SIZE as usize]
    );
}

/// A write of `len` bytes at `offset` whose page `p` (of the export) holds zeroes when
/// `zero(p)`, and the export pages it leaves holding data.
fn mixed_write(offset: u64, len: u64, zero: impl Fn(u64) -> bool) -> (Vec<u8>, Vec<u64>) {
    let data: Vec<u8> = (offset..offset + len)
        .map(|at| {
            if zero(at / PAGE_SIZE) {
                0
            } else {
                (at % 251) as u8 | 1
            }
        })
        .collect();
    let first = offset / PAGE_SIZE;
    let last = (offset + len - 1) / PAGE_SIZE;
    (data, (first..=last).filter(|&p| !zero(p)).collect())
}

/// Pages 12..20 are zero except 15 (a lone data page between zero runs); otherwise every
/// fifth page is zero (runs of four data pages).
fn mixed_zero_page(p: u64) -> bool {
    (12..20).contains(&p) && p != 15 || p % 5 == 2
}

fn populated_fill(options: MemoryOptions, budget: &MemoryBudget) {
    let disk = RamDisk::with_options(4 * CHUNK_SIZE, &options).unwrap();
    // Unaligned, across three chunks, partial pages at both ends (both holding data).
    let (offset, len) = (3 * PAGE_SIZE + 100, 2 * CHUNK_SIZE + 5000);
    let (data, held) = mixed_write(offset, len, mixed_zero_page);
    disk.write(offset, &data).unwrap();
    assert_eq!(read(&disk, offset, data.len()), data);
    let held_bytes = held.len() as u64 * PAGE_SIZE;
    assert_eq!(disk.allocated_bytes(), held_bytes);
    assert_eq!(budget.used_bytes(), held_bytes);
    // RAM only for the data pages: the zero pages among them were not populated.
    assert_eq!(mapped_resident_pages(&disk), held.len() as u64);
    assert_eq!(disk.resident_bytes(), held_bytes);
    if options.backing == BackingKind::Memfd {
        assert_eq!(memfd_bytes(&disk), held_bytes);
    }
    let data_pages: Vec<u64> = disk
        .extents(0, disk.size())
        .scan(0, |pos, (len, state)| {
            let start = *pos;
            *pos += len;
            Some((start / PAGE_SIZE..*pos / PAGE_SIZE, state))
        })
        .filter(|(_, state)| *state == Extent::Data)
        .flat_map(|(pages, _)| pages)
        .collect();
    assert_eq!(data_pages, held, "the allocation bits are the data pages");
    // A streamed write of the same shape one chunk on: reserved whole, squared to the same.
    let mut update = disk.start_write(offset + CHUNK_SIZE, len).unwrap();
    let (data, _) = mixed_write(offset + CHUNK_SIZE, len, |p| mixed_zero_page(p - 64));
    for part in data.chunks(100_000) {
        update.write(part);
    }
    drop(update);
    assert_eq!(budget.used_bytes(), disk.allocated_bytes());
    assert_eq!(disk.resident_bytes(), disk.allocated_bytes());
    assert_eq!(
        mapped_resident_pages(&disk) * PAGE_SIZE,
        disk.allocated_bytes()
    );
    // A trim gives everything back.
    disk.zero(0, disk.size(), ZeroMode::Release).unwrap();
    assert_eq!(budget.used_bytes(), 0);
    assert_eq!(mapped_resident_pages(&disk), 0);
}

fn a_populated_fill_holds_exactly_its_data_pages(kind: BackingKind) {
    let budget = Arc::new(MemoryBudget::new(1 << 30));
    let options = MemoryOptions {
        budgets: vec![Arc::clone(&budget)],
        backing: kind,
        name: "test".into(),
        ..Default::default()
    };
    populated_fill(options, &budget);
}

fn a_populated_fill_holds_exactly_its_data_pages_mlocked(kind: BackingKind) {
    // 1 MiB: inside the default RLIMIT_MEMLOCK of 8 MiB.
    let budget = Arc::new(MemoryBudget::new(1 << 30));
    let options = MemoryOptions {
        budgets: vec![Arc::clone(&budget)],
        backing: kind,
        mlock: true,
        name: "test".into(),
        ..Default::default()
    };
    populated_fill(options, &budget);
}

fn a_populated_fill_that_hits_the_cap_populates_nothing(kind: BackingKind) {
    let (offset, len) = (PAGE_SIZE, CHUNK_SIZE);
    let (data, held) = mixed_write(offset, len, mixed_zero_page);
    let cap = held.len() as u64 * PAGE_SIZE;
    let (disk, budget) = capped(kind, 4 * CHUNK_SIZE, cap);
    disk.write(0, &[5; 2 * PAGE_SIZE as usize]).unwrap();
    // Two pages short: refused before anything is populated or written.
    assert_eq!(disk.write(offset, &data), Err(NoSpace));
    assert_eq!(budget.used_bytes(), 2 * PAGE_SIZE);
    assert_eq!(mapped_resident_pages(&disk), 2);
    assert_eq!(read(&disk, 2 * PAGE_SIZE, 8), vec![0; 8]);
    // With the room made, it fits the cap exactly: only its data pages were populated.
    disk.zero(0, 2 * PAGE_SIZE, ZeroMode::Release).unwrap();
    disk.write(offset, &data).unwrap();
    assert_eq!(budget.used_bytes(), cap);
    assert_eq!(disk.allocated_bytes(), cap);
    assert_eq!(mapped_resident_pages(&disk) * PAGE_SIZE, cap);
    assert_eq!(
        disk.write(3 * CHUNK_SIZE, &[1; 2 * PAGE_SIZE as usize]),
        Err(NoSpace)
    );
    assert_eq!(mapped_resident_pages(&disk) * PAGE_SIZE, cap);
}
