//! What a connection to an export can do, as one value: the transmission flags the server
//! advertises and the command flags it accepts both derive from it, so the two can never
//! disagree.

use super::consts::*;

/// The features of one export on one connection (they depend on the negotiated reply format).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    flags: u16,
    extended: bool,
}

impl Capabilities {
    /// A RAM disk does natively everything NBD can ask: FLUSH and FUA are free (writes are in
    /// RAM when replied), TRIM and WRITE_ZEROES release pages, zeroing is always fast, CACHE is
    /// a no-op, and every connection sees one mapping, so multi-conn is safe. DF only makes
    /// sense (and is only allowed) with structured replies. Never ROTATIONAL.
    pub fn ram_disk(read_only: bool, structured: bool, extended: bool) -> Capabilities {
        let mut flags = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_CAN_MULTI_CONN
            | TFLAG_SEND_CACHE
            | TFLAG_SEND_FAST_ZERO;
        if structured || extended {
            flags |= TFLAG_SEND_DF;
        }
        if read_only {
            flags |= TFLAG_READ_ONLY;
        }
        Capabilities { flags, extended }
    }

    /// The 16 transmission flags of `NBD_INFO_EXPORT` and the `EXPORT_NAME` reply.
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }

    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// The command flags a request of `command` may carry, each allowed by the transmission
    /// flag that advertises it. FUA is accepted on every command once SEND_FUA is advertised,
    /// as the spec requires; PAYLOAD_LEN only on WRITE, where it changes nothing.
    pub fn allowed_flags(&self, command: u16) -> u16 {
        let mut allowed = 0;
        if self.has(TFLAG_SEND_FUA) {
            allowed |= CMD_FLAG_FUA;
        }
        match command {
            CMD_READ if self.has(TFLAG_SEND_DF) => allowed |= CMD_FLAG_DF,
            CMD_WRITE if self.extended => allowed |= CMD_FLAG_PAYLOAD_LEN,
            CMD_WRITE_ZEROES => {
                if self.has(TFLAG_SEND_WRITE_ZEROES) {
                    allowed |= CMD_FLAG_NO_HOLE;
                }
                if self.has(TFLAG_SEND_FAST_ZERO) {
                    allowed |= CMD_FLAG_FAST_ZERO;
                }
            }
            CMD_BLOCK_STATUS => allowed |= CMD_FLAG_REQ_ONE,
            _ => {}
        }
        allowed
    }

    /// The capabilities of a resumed connection (`session::resume`) that was advertised
    /// `advertised`, by this binary or an earlier one, on an export for which this binary
    /// offers `self`: exactly the advertised flags, so the client keeps what it was told, if
    /// this binary can honour every one of them. READ_ONLY can always be honoured; a client
    /// told it may write cannot be kept once the export is read-only. `None` if not.
    pub fn honouring(self, advertised: u16) -> Option<Capabilities> {
        let honourable = self.flags | TFLAG_READ_ONLY;
        let lost_write = self.read_only() && advertised & TFLAG_READ_ONLY == 0;
        if advertised & !honourable != 0 || lost_write {
            return None;
        }
        Some(Capabilities {
            flags: advertised,
            extended: self.extended,
        })
    }

    /// Whether the export accepts `command` at all.
    pub fn supports(&self, command: u16) -> bool {
        match command {
            CMD_READ | CMD_WRITE | CMD_DISC | CMD_BLOCK_STATUS => true,
            CMD_FLUSH => self.has(TFLAG_SEND_FLUSH),
            CMD_TRIM => self.has(TFLAG_SEND_TRIM),
            CMD_CACHE => self.has(TFLAG_SEND_CACHE),
            CMD_WRITE_ZEROES => self.has(TFLAG_SEND_WRITE_ZEROES),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_flags_follow_the_advertised_ones() {
        let simple = Capabilities::ram_disk(false, false, false);
        assert_eq!(simple.transmission_flags() & TFLAG_SEND_DF, 0);
        assert_eq!(
            simple.allowed_flags(CMD_READ),
            CMD_FLAG_FUA,
            "no DF without structured"
        );
        assert_eq!(simple.allowed_flags(CMD_WRITE), CMD_FLAG_FUA);
        let extended = Capabilities::ram_disk(true, false, true);
        assert!(extended.read_only());
        assert_ne!(extended.transmission_flags() & TFLAG_SEND_DF, 0);
        assert_eq!(extended.allowed_flags(CMD_READ), CMD_FLAG_FUA | CMD_FLAG_DF);
        assert_eq!(
            extended.allowed_flags(CMD_WRITE),
            CMD_FLAG_FUA | CMD_FLAG_PAYLOAD_LEN
        );
        assert_eq!(
            extended.allowed_flags(CMD_WRITE_ZEROES),
            CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO
        );
        assert_eq!(extended.allowed_flags(99), CMD_FLAG_FUA);
        assert!(!extended.supports(99));
    }

    #[test]
    fn a_resumed_connection_keeps_the_flags_it_was_advertised_if_they_can_be_honoured() {
        let writable = Capabilities::ram_disk(false, true, false);
        let advertised = writable.transmission_flags();
        assert_eq!(writable.honouring(advertised), Some(writable));
        // Fewer flags than this binary offers: kept as advertised, and accepted as such.
        let fewer = advertised & !TFLAG_SEND_TRIM;
        let kept = writable.honouring(fewer).unwrap();
        assert_eq!(kept.transmission_flags(), fewer);
        assert!(!kept.supports(CMD_TRIM));
        // Read-only can always be kept; write access on a now read-only export cannot, nor a
        // flag this binary does not offer.
        assert!(
            writable
                .honouring(advertised | TFLAG_READ_ONLY)
                .unwrap()
                .read_only()
        );
        let read_only = Capabilities::ram_disk(true, true, false);
        assert_eq!(read_only.honouring(advertised), None);
        let rotational = 1 << 4;
        assert_eq!(writable.honouring(advertised | rotational), None);
    }
}
