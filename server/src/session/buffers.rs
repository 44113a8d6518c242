//! A connection's two buffers, each a fixed-size anonymous mapping made when the connection
//! starts and unmapped when it ends. Fixed: a connection's memory is bounded by construction,
//! whatever its clients send (a request of any length streams through). Mappings rather than
//! the heap: the C allocator keeps freed large buffers in per-thread arenas, so an idle server
//! would hold megabytes of buffers its closed connections used; an unmapped buffer is gone.
//! Only the pages a connection really uses become resident.

use std::io;

use memmap2::MmapMut;

use crate::proto::transmission::Sink;

/// Bytes received and not yet consumed, kept contiguous at the front of the buffer.
#[derive(Debug)]
pub struct ReceiveBuffer {
    buf: MmapMut,
    start: usize,
    end: usize,
}

/// Leftover bytes up to this size are moved to the front whenever there is room to gain, so a
/// connection with small requests keeps using the first pages of its buffer.
const SMALL_LEFTOVER: usize = 64 * 1024;

impl ReceiveBuffer {
    pub fn new(capacity: usize) -> io::Result<Self> {
        Ok(Self {
            buf: MmapMut::map_anon(capacity)?,
            start: 0,
            end: 0,
        })
    }

    /// The bytes received and not yet consumed.
    pub fn filled(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    pub fn consume(&mut self, n: usize) {
        assert!(n <= self.len(), "consumed more than was received");
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Makes sure `total` bytes from the start of the data fit in one piece: moves the data to
    /// the front if they would not.
    pub fn make_room_for(&mut self, total: usize) {
        assert!(total <= self.capacity(), "a message larger than the buffer");
        if self.start + total > self.capacity() {
            self.compact();
        }
    }

    /// Free space after the data, for the next read; empty when the buffer is full.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start > 0 && (self.end == self.capacity() || self.len() <= SMALL_LEFTOVER) {
            self.compact();
        }
        &mut self.buf[self.end..]
    }

    pub fn has_spare(&self) -> bool {
        self.len() < self.capacity()
    }

    /// Records that `n` bytes were read into [`ReceiveBuffer::spare`].
    pub fn filled_by(&mut self, n: usize) {
        assert!(self.end + n <= self.capacity());
        self.end += n;
    }

    fn compact(&mut self) {
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
    }
}

/// Replies waiting to be written, after a pad that keeps them off page alignment.
#[derive(Debug)]
pub struct SendBuffer {
    buf: MmapMut,
    /// Leading bytes that are never written: see [`ALIASING_PAD`].
    pad: usize,
    /// End of the encoded replies.
    len: usize,
    /// Bytes of the replies already written.
    sent: usize,
    /// Bytes written before the current contents (for locating a reply's end in the stream).
    sent_before: u64,
}

/// Replies start this far into a page. The store's pages are page-aligned, and a copy whose
/// destination sits just after its source modulo 4 KiB stalls on "4K aliasing" (the CPU takes
/// loads to depend on the stores just made): a page-aligned send buffer halved 1 MiB READ
/// throughput.
pub const ALIASING_PAD: usize = 2048;

impl SendBuffer {
    pub fn new(capacity: usize) -> io::Result<Self> {
        Ok(Self {
            buf: MmapMut::map_anon(capacity + ALIASING_PAD)?,
            pad: ALIASING_PAD,
            len: ALIASING_PAD,
            sent: ALIASING_PAD,
            sent_before: 0,
        })
    }

    /// Bytes encoded and not yet written.
    pub fn unsent(&self) -> &[u8] {
        &self.buf[self.sent..self.len]
    }

    pub fn has_unsent(&self) -> bool {
        self.sent < self.len
    }

    /// Bytes encoded since the buffer was last empty.
    pub fn encoded(&self) -> usize {
        self.len - self.pad
    }

    /// Room left for encoding.
    pub fn room(&self) -> usize {
        self.buf.len() - self.len
    }

    /// Where the replies encoded so far end, counted over the whole connection.
    pub fn stream_position(&self) -> u64 {
        self.sent_before + (self.len - self.pad) as u64
    }

    /// Bytes written over the whole connection.
    pub fn sent_total(&self) -> u64 {
        self.sent_before + (self.sent - self.pad) as u64
    }

    /// The next `n` bytes of room, to be filled and then [`SendBuffer::commit`]ted.
    pub fn spare(&mut self, n: usize) -> &mut [u8] {
        &mut self.buf[self.len..self.len + n]
    }

    pub fn commit(&mut self, n: usize) {
        assert!(n <= self.room());
        self.len += n;
    }

    /// Overwrites encoded bytes from `at` (a value of [`SendBuffer::encoded`] taken earlier).
    pub fn patch(&mut self, at: usize, bytes: &[u8]) {
        let at = self.pad + at;
        assert!(
            at >= self.sent && at + bytes.len() <= self.len,
            "patch outside the unsent replies"
        );
        self.buf[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// Records that `n` bytes of the connection's output went to the stream without passing
    /// through this buffer (READ data sent straight from the store), which must be empty: they
    /// count in [`SendBuffer::stream_position`] and [`SendBuffer::sent_total`].
    pub fn sent_elsewhere(&mut self, n: usize) {
        assert!(!self.has_unsent(), "output sent around unsent replies");
        self.sent_before += n as u64;
    }

    /// Records that `n` bytes of [`SendBuffer::unsent`] were written.
    pub fn written(&mut self, n: usize) {
        assert!(self.sent + n <= self.len);
        self.sent += n;
        if self.sent == self.len {
            self.sent_before += (self.len - self.pad) as u64;
            self.len = self.pad;
            self.sent = self.pad;
        }
    }
}

impl Sink for SendBuffer {
    fn put(&mut self, bytes: &[u8]) {
        self.spare(bytes.len()).copy_from_slice(bytes);
        self.commit(bytes.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_bytes_stay_contiguous_and_small_leftovers_move_to_the_front() {
        let mut input = ReceiveBuffer::new(100_000).unwrap();
        input.spare()[..10].copy_from_slice(b"0123456789");
        input.filled_by(10);
        input.consume(4);
        assert_eq!(input.filled(), b"456789");
        // Asking for room moves the small leftover to the front.
        let room = input.spare().len();
        assert_eq!(room, 100_000 - 6);
        assert_eq!(input.filled(), b"456789");
        input.make_room_for(100_000);
        input.consume(6);
        assert_eq!(input.len(), 0);
    }

    #[test]
    fn replies_are_written_in_order_and_counted_over_the_connection() {
        let mut out = SendBuffer::new(64).unwrap();
        assert_eq!(
            out.buf.as_ptr() as usize % 4096,
            0,
            "mappings are page-aligned"
        );
        out.put(b"abcd");
        let at = out.encoded();
        out.put(b"xx");
        out.patch(at, b"ef");
        assert_eq!(out.unsent(), b"abcdef");
        assert_eq!(out.stream_position(), 6);
        out.written(2);
        assert_eq!(out.unsent(), b"cdef");
        out.written(4);
        assert!(!out.has_unsent());
        assert_eq!(out.sent_total(), 6);
        assert_eq!(out.room(), 64);
    }
}
