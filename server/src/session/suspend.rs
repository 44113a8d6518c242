//! A session suspended at a request boundary by a hand-over ([`crate::shutdown`]), and its
//! encoding: what another process needs to carry the connection on.
//!
//! The socket travels on its own (the service manager's fd store, or SCM_RIGHTS); this is the
//! state that goes with it. At a request boundary that is little: what the handshake agreed
//! (export, reply format, advertised flags, metadata context) and the bytes already read from
//! the socket but not yet executed, which the resumed session reads before the socket's. No
//! request is in flight: every request started has had its reply sent.
//!
//! # Encoding
//!
//! Binary, big-endian like NBD, one version number for the whole layout. A binary reads every
//! version up to its own ([`STATE_VERSION`]) and refuses a newer one with
//! [`StateError::UnknownVersion`], so that after a downgrade the connection is closed cleanly
//! instead of being misread. Version 1:
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 8 | magic `RAMNBDSS` |
//! | 8 | 2 | version (1) |
//! | 10 | 2 | mode bits: 0 structured replies, 1 extended headers, 2 `base:allocation` selected; the others zero |
//! | 12 | 2 | transmission flags advertised to the client |
//! | 14 | 4 | `base:allocation` context id (zero unless bit 2) |
//! | 18 | 8 | export size in bytes |
//! | 26 | 2 | export name length N (at most 4096) |
//! | 28 | N | export name, UTF-8 |
//! | 28+N | 4 | pending input length P (at most [`MAX_PENDING`]) |
//! | 32+N | P | pending input |
//!
//! Nothing follows. Decoding takes untrusted bytes: every length is bounded before anything is
//! allocated, and every malformation is an error, never a panic.

use crate::export::Exports;
use crate::proto::Capabilities;
use crate::proto::consts::MAX_STRING;

use super::Negotiated;

/// The newest layout this binary writes and reads.
pub const STATE_VERSION: u16 = 1;

/// The first bytes of every encoded state.
const MAGIC: &[u8; 8] = b"RAMNBDSS";

/// Pending input is at most what the receive buffer holds.
pub const MAX_PENDING: usize = super::transmit::RECEIVE_CAPACITY;

const MODE_STRUCTURED: u16 = 1 << 0;
const MODE_EXTENDED: u16 = 1 << 1;
const MODE_BASE_ALLOCATION: u16 = 1 << 2;
const MODE_KNOWN: u16 = MODE_STRUCTURED | MODE_EXTENDED | MODE_BASE_ALLOCATION;

/// Everything the transmission phase needs to carry a connection on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suspended {
    /// The export the client selected.
    pub export: String,
    /// Its size as the client was told: a differently sized export is refused.
    pub export_size: u64,
    pub structured: bool,
    pub extended: bool,
    /// The transmission flags advertised to the client; the resumed session accepts exactly
    /// these ([`Capabilities::honouring`]).
    pub transmission_flags: u16,
    /// The id of `base:allocation`, if the client selected it.
    pub base_allocation: Option<u32>,
    /// Bytes read from the socket and not yet executed: the start of the next requests.
    pub pending: Vec<u8>,
}

/// Why encoded state could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("not a ramnbd session state (bad magic)")]
    NotState,
    #[error(
        "session state version {0} is newer than this ramnbd reads (up to {STATE_VERSION}): \
         it was written by a newer release"
    )]
    UnknownVersion(u16),
    #[error("session state truncated in its {0}")]
    Truncated(&'static str),
    #[error("session state has an invalid {0}")]
    Invalid(&'static str),
    #[error("session state has {0} bytes after its end")]
    TrailingBytes(usize),
}

/// Why a suspended session cannot be resumed on this server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    #[error("export {0:?} does not exist on this server")]
    NoExport(String),
    #[error("export {name:?} is {now} bytes, but the client was told {then}")]
    SizeChanged { name: String, then: u64, now: u64 },
    #[error(
        "export {name:?} cannot honour the transmission flags {flags:#06x} the client was \
         advertised (has it become read-only?)"
    )]
    Capabilities { name: String, flags: u16 },
    #[error("{0} bytes of pending input are more than a session holds ({MAX_PENDING})")]
    PendingTooLong(usize),
}

impl Suspended {
    /// The state of a session that stopped at a request boundary with `pending` unexecuted.
    pub(super) fn new(negotiated: &Negotiated, pending: &[u8]) -> Suspended {
        Suspended {
            export: negotiated.export.name.clone(),
            export_size: negotiated.export.size(),
            structured: negotiated.structured,
            extended: negotiated.extended,
            transmission_flags: negotiated.capabilities.transmission_flags(),
            base_allocation: negotiated.base_allocation,
            pending: pending.to_vec(),
        }
    }

    /// The negotiated state to carry on with on this server, if its export still matches.
    pub fn negotiated(&self, exports: &Exports) -> Result<Negotiated, ResumeError> {
        let name = &self.export;
        let export = exports
            .get(name)
            .ok_or_else(|| ResumeError::NoExport(name.clone()))?;
        if export.size() != self.export_size {
            return Err(ResumeError::SizeChanged {
                name: name.clone(),
                then: self.export_size,
                now: export.size(),
            });
        }
        if self.pending.len() > MAX_PENDING {
            return Err(ResumeError::PendingTooLong(self.pending.len()));
        }
        let offered = Capabilities::ram_disk(export.read_only, self.structured, self.extended);
        let capabilities = offered.honouring(self.transmission_flags).ok_or_else(|| {
            ResumeError::Capabilities {
                name: name.clone(),
                flags: self.transmission_flags,
            }
        })?;
        Ok(Negotiated {
            export: std::sync::Arc::clone(export),
            // Extended headers imply structured replies, as the handshake records them.
            structured: self.structured || self.extended,
            extended: self.extended,
            capabilities,
            base_allocation: self.base_allocation,
            // TLS connections are never handed over (see `crate::session`).
            secured: false,
            tls_identity: None,
        })
    }

    /// The state in the current layout ([`STATE_VERSION`]).
    ///
    /// # Panics
    /// If the export name is longer than 4096 bytes or the pending input longer than
    /// [`MAX_PENDING`]: a session never produces either.
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.export.len() <= MAX_STRING, "export name too long");
        assert!(self.pending.len() <= MAX_PENDING, "pending input too long");
        let mut mode = 0;
        if self.structured {
            mode |= MODE_STRUCTURED;
        }
        if self.extended {
            mode |= MODE_EXTENDED;
        }
        if self.base_allocation.is_some() {
            mode |= MODE_BASE_ALLOCATION;
        }
        let mut out = Vec::with_capacity(32 + self.export.len() + self.pending.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_be_bytes());
        out.extend_from_slice(&mode.to_be_bytes());
        out.extend_from_slice(&self.transmission_flags.to_be_bytes());
        out.extend_from_slice(&self.base_allocation.unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&self.export_size.to_be_bytes());
        out.extend_from_slice(&(self.export.len() as u16).to_be_bytes());
        out.extend_from_slice(self.export.as_bytes());
        out.extend_from_slice(&(self.pending.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.pending);
        out
    }

    /// Reads state written by [`Suspended::encode`] of this release or an earlier one.
    pub fn decode(bytes: &[u8]) -> Result<Suspended, StateError> {
        let mut input = Input(bytes);
        if input.take(MAGIC.len(), "magic")? != MAGIC {
            return Err(StateError::NotState);
        }
        match input.u16("version")? {
            1 => {}
            version => return Err(StateError::UnknownVersion(version)),
        }
        let mode = input.u16("mode")?;
        if mode & !MODE_KNOWN != 0 {
            return Err(StateError::Invalid("mode"));
        }
        let transmission_flags = input.u16("transmission flags")?;
        let context = input.u32("context id")?;
        let base_allocation = if mode & MODE_BASE_ALLOCATION != 0 {
            Some(context)
        } else if context == 0 {
            None
        } else {
            return Err(StateError::Invalid("context id"));
        };
        let export_size = input.u64("export size")?;
        let name_len = usize::from(input.u16("export name length")?);
        if name_len > MAX_STRING {
            return Err(StateError::Invalid("export name length"));
        }
        let export = std::str::from_utf8(input.take(name_len, "export name")?)
            .map_err(|_| StateError::Invalid("export name"))?
            .to_owned();
        let pending_len = input.u32("pending length")? as usize;
        if pending_len > MAX_PENDING {
            return Err(StateError::Invalid("pending length"));
        }
        let pending = input.take(pending_len, "pending input")?.to_vec();
        if !input.0.is_empty() {
            return Err(StateError::TrailingBytes(input.0.len()));
        }
        Ok(Suspended {
            export,
            export_size,
            structured: mode & MODE_STRUCTURED != 0,
            extended: mode & MODE_EXTENDED != 0,
            transmission_flags,
            base_allocation,
            pending,
        })
    }
}

/// The bytes of an encoded state not yet read.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], StateError> {
        if self.0.len() < n {
            return Err(StateError::Truncated(field));
        }
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], StateError> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.take(N, field)?);
        Ok(array)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, StateError> {
        self.array(field).map(u16::from_be_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, StateError> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, StateError> {
        self.array(field).map(u64::from_be_bytes)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sample() -> Suspended {
        Suspended {
            export: "disk".to_owned(),
            export_size: 1 << 30,
            structured: true,
            extended: true,
            transmission_flags: 0x0ded,
            base_allocation: Some(1),
            pending: b"\x25\x60\x95\x13 half a request".to_vec(),
        }
    }

    #[test]
    fn version_1_has_the_documented_layout() {
        let encoded = sample().encode();
        let mut expected = b"RAMNBDSS".to_vec();
        expected.extend([0, 1, 0, 0b111, 0x0d, 0xed, 0, 0, 0, 1]);
        expected.extend((1u64 << 30).to_be_bytes());
        expected.extend([0, 4]);
        expected.extend(b"disk");
        let pending = b"\x25\x60\x95\x13 half a request";
        expected.extend((pending.len() as u32).to_be_bytes());
        expected.extend(pending);
        assert_eq!(encoded, expected);
        assert_eq!(Suspended::decode(&encoded), Ok(sample()));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let encoded = sample().encode();
        for len in 0..encoded.len() {
            let decoded = Suspended::decode(&encoded[..len]);
            assert!(
                matches!(decoded, Err(StateError::Truncated(_))),
                "{len} bytes: {decoded:?}"
            );
        }
        let mut longer = encoded;
        longer.push(0);
        assert_eq!(
            Suspended::decode(&longer),
            Err(StateError::TrailingBytes(1))
        );
    }

    #[test]
    fn malformed_fields_are_named_and_newer_versions_refused() {
        let encoded = sample().encode();
        let with = |at: usize, bytes: &[u8]| {
            let mut changed = encoded.clone();
            changed[at..at + bytes.len()].copy_from_slice(bytes);
            Suspended::decode(&changed)
        };
        assert_eq!(with(0, b"NOTSTATE"), Err(StateError::NotState));
        let newer = with(8, &[0, 2]).unwrap_err();
        assert_eq!(newer, StateError::UnknownVersion(2));
        assert!(newer.to_string().contains("newer release"), "{newer}");
        assert_eq!(with(8, &[0, 0]), Err(StateError::UnknownVersion(0)));
        assert_eq!(with(10, &[0, 8]), Err(StateError::Invalid("mode")));
        // A context id without base:allocation selected.
        assert_eq!(with(10, &[0, 3]), Err(StateError::Invalid("context id")));
        assert_eq!(with(26, &[1, 0]), Err(StateError::Truncated("export name")));
        assert_eq!(with(28, &[0xff]), Err(StateError::Invalid("export name")));
        let huge = (MAX_PENDING as u32 + 1).to_be_bytes();
        assert_eq!(with(32, &huge), Err(StateError::Invalid("pending length")));
        let mut long_name = sample();
        long_name.export = "x".repeat(MAX_STRING);
        let mut encoded = long_name.encode();
        assert_eq!(Suspended::decode(&encoded), Ok(long_name));
        encoded[26..28].copy_from_slice(&(MAX_STRING as u16 + 1).to_be_bytes());
        assert_eq!(
            Suspended::decode(&encoded),
            Err(StateError::Invalid("export name length"))
        );
    }

    proptest! {
        #[test]
        fn any_state_round_trips(
            export in "[a-z/\u{e9}]{0,40}",
            export_size: u64,
            structured: bool,
            extended: bool,
            transmission_flags: u16,
            base_allocation: Option<u32>,
            pending in proptest::collection::vec(any::<u8>(), 0..4096),
        ) {
            let state = Suspended {
                export,
                export_size,
                structured,
                extended,
                transmission_flags,
                // Zero is the encoding of "none", and the handshake never gives it.
                base_allocation: base_allocation.map(|id| id.max(1)),
                pending,
            };
            prop_assert_eq!(Suspended::decode(&state.encode()), Ok(state));
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Suspended::decode(&bytes);
            // With a valid magic and version, so that the fields behind them are reached.
            let mut framed = b"RAMNBDSS\0\x01".to_vec();
            framed.extend(&bytes);
            let _ = Suspended::decode(&framed);
        }

        #[test]
        fn a_changed_byte_is_read_or_refused_never_a_panic(at in 0usize..52, value: u8) {
            let mut encoded = sample().encode();
            encoded[at] = value;
            if let Ok(state) = Suspended::decode(&encoded) {
                prop_assert_eq!(state.encode(), encoded);
            }
        }
    }
}
