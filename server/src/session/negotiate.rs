//! The handshake: fixed newstyle with NO_ZEROES, then options until the client picks an export
//! (GO or EXPORT_NAME), leaves, or starts TLS (STARTTLS: the caller upgrades the stream and
//! runs [`options`] again over TLS, with the state [`State::secured`] reset).
//!
//! TLS modes (spec, "TLS"): with TLS off STARTTLS gets `ERR_POLICY` (NOTLS). With
//! `require`, before TLS every option but STARTTLS and ABORT gets `ERR_TLS_REQD` and
//! EXPORT_NAME closes the connection (FORCEDTLS). With `on`, exports marked `tls=require` are
//! hidden from LIST before TLS, INFO and GO for them get `ERR_TLS_REQD` and EXPORT_NAME for
//! them closes (SELECTIVETLS). The TLS requirement is judged before the export's access rules
//! (the spec's MUST for INFO/GO); both hide an export from LIST.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::access::Peer;
use crate::export::{Export, Exports};
use crate::logsafe::Untrusted;
use crate::proto::Capabilities;
use crate::proto::consts::*;
use crate::proto::handshake::{self, option_reply};
use crate::proto::transmission::ReplyMode;
use crate::shutdown::{DRAIN_IDLE, Phase, PhaseWatch};
use crate::tls::{Established, TlsMode};

/// The id this server gives `base:allocation` in SET_META_CONTEXT.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// What the handshake agreed on; everything the transmission phase needs.
#[derive(Debug)]
pub struct Negotiated {
    pub export: Arc<Export>,
    pub structured: bool,
    pub extended: bool,
    /// What the export advertised and so accepts on this connection.
    pub capabilities: Capabilities,
    /// The id of `base:allocation`, if the client selected it for this export.
    pub base_allocation: Option<u32>,
    /// The connection runs over TLS: replies are flushed through the TLS layer after each
    /// write, and it cannot be handed over.
    pub secured: bool,
    /// The verified client certificate's subject CN (see [`crate::tls`]).
    pub tls_identity: Option<String>,
}

impl Negotiated {
    pub fn reply_mode(&self) -> ReplyMode {
        if self.extended {
            ReplyMode::Extended
        } else if self.structured {
            ReplyMode::Structured
        } else {
            ReplyMode::Simple
        }
    }
}

/// Log lines about one client's options logged in full; the rest are counted and summed up in
/// one line when the handshake ends. A client looping over options that each provoke a line
/// (unknown or refused exports, malformed requests) must not flood the log.
pub const PROVOKED_LINES: u32 = 16;

/// The per-connection budget of log lines the client's options provoke (before and after
/// STARTTLS together).
#[derive(Debug, Default)]
pub struct ClientLog {
    logged: u32,
    suppressed: u64,
}

impl ClientLog {
    /// Whether the next provoked line may be logged; counts it if not.
    fn admit(&mut self) -> bool {
        if self.logged < PROVOKED_LINES {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// The summary line, if lines were suppressed.
    pub fn finish(&self) {
        if self.suppressed > 0 {
            tracing::info!(
                suppressed = self.suppressed,
                "{} more lines about this client's options suppressed (at most {PROVOKED_LINES} \
                 per connection are logged)",
                self.suppressed
            );
        }
    }
}

/// Option-phase state that later options change.
#[derive(Debug, Default)]
pub struct State {
    fixed_newstyle: bool,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// Export for which SET_META_CONTEXT selected base:allocation.
    meta_export: Option<String>,
    /// The server's TLS mode for this connection.
    tls_mode: TlsMode,
    /// What STARTTLS established; `None` before TLS.
    tls: Option<Established>,
}

/// How the option phase ended.
#[derive(Debug)]
pub enum Outcome {
    /// The client aborted, broke a rule that ends the connection, or the server is stopping.
    Close,
    Transmit(Negotiated),
    /// STARTTLS was acknowledged: the next bytes are the client's TLS handshake.
    StartTls,
}

impl State {
    /// Sets the TLS mode the options are judged by.
    pub fn with_tls_mode(mut self, mode: TlsMode) -> State {
        self.tls_mode = mode;
        self
    }

    /// After the TLS handshake: everything negotiated before is forgotten (the spec's MUST),
    /// but the handshake flags stay. (The caller puts the identity in
    /// [`Peer::tls_identity`], which the exports' `allow-identity` rules match.)
    pub fn secured(self, established: Established) -> State {
        State {
            fixed_newstyle: self.fixed_newstyle,
            no_zeroes: self.no_zeroes,
            tls_mode: self.tls_mode,
            tls: Some(established),
            ..State::default()
        }
    }

    /// The verified client certificate's identity (subject CN), once TLS is established.
    pub fn tls_identity(&self) -> Option<&str> {
        self.tls.as_ref()?.identity.as_deref()
    }

    /// Before STARTTLS with TLS required for everything (FORCEDTLS).
    fn tls_forced(&self) -> bool {
        self.tls.is_none() && self.tls_mode == TlsMode::Require
    }

    /// Whether `export` may not be used yet because it needs TLS and this is not TLS.
    fn needs_tls(&self, export: &Export) -> bool {
        self.tls.is_none() && export.tls_required
    }

    /// What `export` offers with the reply format negotiated so far: the same value gives the
    /// flags INFO, GO and EXPORT_NAME advertise and the command flags transmission accepts.
    fn capabilities(&self, export: &Export) -> Capabilities {
        Capabilities::ram_disk(export.read_only, self.structured, self.extended)
    }
}

/// Sends the greeting and reads the client's flags: the state to run [`options`] with, or
/// `None` if the connection is to close (logged).
pub async fn greet<R, W>(
    reader: &mut R,
    writer: &mut W,
    watch: &mut PhaseWatch,
) -> io::Result<Option<State>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    writer.write_all(&greeting).await?;

    let mut client_flags = [0u8; 4];
    if !read_watching(reader, &mut client_flags, watch).await? {
        tracing::debug!("server stopping before the client sent its flags: closing");
        return Ok(None);
    }
    let client_flags = u32::from_be_bytes(client_flags);
    // Spec: the server MUST drop the connection on a client flag it did not advertise.
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        tracing::info!(client_flags, "client sent unknown handshake flags, closing");
        return Ok(None);
    }
    Ok(Some(State {
        fixed_newstyle: client_flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        ..State::default()
    }))
}

/// Runs the handshake without TLS: [`greet`], then [`options`]; `Ok(None)` where the
/// connection is to close. For tests that drive negotiation and transmission apart.
#[cfg(test)]
pub async fn negotiate<R, W>(
    reader: &mut R,
    writer: &mut W,
    exports: &Exports,
    peer: &mut Peer,
    watch: &mut PhaseWatch,
) -> io::Result<Option<Negotiated>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Some(mut state) = greet(reader, writer, watch).await? else {
        return Ok(None);
    };
    let mut log = ClientLog::default();
    let outcome = options(reader, writer, exports, peer, watch, &mut state, &mut log).await;
    log.finish();
    match outcome? {
        Outcome::Transmit(negotiated) => Ok(Some(negotiated)),
        Outcome::Close | Outcome::StartTls => Ok(None),
    }
}

/// Reads and answers options until the client picks an export, leaves, or starts TLS.
///
/// Once the server is stopping, every option gets `NBD_REP_ERR_SHUTDOWN` ("the server is
/// unwilling to continue negotiation as it is in the process of being shut down"), ABORT its
/// ACK, and the connection closes when the client goes quiet, or when closing begins.
///
/// `peer` is who the exports' access rules judge: an export it may not use is left out of
/// LIST and refused with `NBD_REP_ERR_POLICY` (EXPORT_NAME: closed) before anything about it
/// is revealed or opened. `log`: the connection's budget of provoked log lines.
pub async fn options<R, W>(
    reader: &mut R,
    writer: &mut W,
    exports: &Exports,
    peer: &mut Peer,
    watch: &mut PhaseWatch,
    state: &mut State,
    log: &mut ClientLog,
) -> io::Result<Outcome>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::new();
    loop {
        let mut header = [0u8; 16];
        if !read_watching(reader, &mut header, watch).await? {
            tracing::debug!("server stopping, client quiet: closing the handshake");
            return Ok(Outcome::Close);
        }
        let magic = u64::from_be_bytes(header[..8].try_into().expect("8 bytes"));
        let option = u32::from_be_bytes(header[8..12].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(header[12..].try_into().expect("4 bytes"));
        if magic != IHAVEOPT {
            tracing::info!(magic, "bad option magic, closing");
            return Ok(Outcome::Close);
        }
        if !state.fixed_newstyle && option != OPT_EXPORT_NAME {
            // Plain newstyle clients may only send EXPORT_NAME, and cannot read error replies.
            tracing::info!(
                option,
                "non-fixed-newstyle client sent an option other than EXPORT_NAME"
            );
            return Ok(Outcome::Close);
        }
        if len > MAX_OPTION_DATA {
            if option == OPT_EXPORT_NAME {
                tracing::info!(len, "EXPORT_NAME longer than any name, closing");
                return Ok(Outcome::Close);
            }
            // Drain without buffering so the option stream stays in sync.
            let mut scratch = [0u8; 4096];
            let mut left = len as usize;
            while left > 0 {
                let n = left.min(scratch.len());
                if !read_watching(reader, &mut scratch[..n], watch).await? {
                    return Ok(Outcome::Close);
                }
                left -= n;
            }
            out.clear();
            option_reply(&mut out, option, REP_ERR_TOO_BIG, b"option data too large");
            writer.write_all(&out).await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        if !read_watching(reader, &mut data, watch).await? {
            return Ok(Outcome::Close);
        }
        tracing::debug!(option, len, "option");

        out.clear();
        let step = if watch.refresh() >= Phase::Stopping {
            refuse_option(option, &mut out)
        } else {
            handle_option(option, &data, state, exports, peer, log, &mut out)
        };
        writer.write_all(&out).await?;
        match step {
            Step::Continue => {}
            Step::Close => return Ok(Outcome::Close),
            Step::StartTls => {
                writer.flush().await?;
                return Ok(Outcome::StartTls);
            }
            Step::Transmit(export) => {
                let base_allocation = (state.meta_export.as_deref() == Some(export.name.as_str()))
                    .then_some(BASE_ALLOCATION_ID);
                return Ok(Outcome::Transmit(Negotiated {
                    capabilities: state.capabilities(&export),
                    export,
                    structured: state.structured || state.extended,
                    extended: state.extended,
                    base_allocation,
                    secured: state.tls.is_some(),
                    tls_identity: state.tls_identity().map(str::to_owned),
                }));
            }
        }
    }
}

enum Step {
    Continue,
    Close,
    Transmit(Arc<Export>),
    StartTls,
}

/// Fills `buf` from the client, following the shutdown phases. While the server runs it waits
/// as long as the client likes. Once stopping, a client quiet for [`DRAIN_IDLE`] ends the
/// handshake, and so does the closing phase: `Ok(false)`. `read` is cancel-safe, so waking
/// for a phase change loses no bytes. Every read of the handshake goes through here.
async fn read_watching<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
    watch: &mut PhaseWatch,
) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let n = match watch.seen() {
            Phase::Running => tokio::select! {
                read = reader.read(&mut buf[got..]) => read?,
                () = watch.changed() => continue,
            },
            Phase::Stopping => tokio::select! {
                read = tokio::time::timeout(DRAIN_IDLE, reader.read(&mut buf[got..])) => {
                    match read {
                        Ok(read) => read?,
                        Err(_quiet) => return Ok(false),
                    }
                }
                () = watch.changed() => continue,
            },
            Phase::Closing | Phase::Aborting => return Ok(false),
        };
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(true)
}

/// The answer to an option while the server is stopping.
fn refuse_option(option: u32, out: &mut Vec<u8>) -> Step {
    match option {
        OPT_ABORT => {
            option_reply(out, option, REP_ACK, &[]);
            Step::Close
        }
        // EXPORT_NAME has no error reply; the spec's only answer is to close.
        OPT_EXPORT_NAME => Step::Close,
        _ => {
            option_reply(out, option, REP_ERR_SHUTDOWN, b"server is shutting down");
            Step::Continue
        }
    }
}

/// Whether `peer` is refused `export` (for `op`), logged within the client's budget.
fn refused(op: &str, export: &Export, peer: &Peer, log: &mut ClientLog) -> bool {
    let Err(refusal) = export.access.check(peer) else {
        return false;
    };
    if log.admit() {
        let name = Untrusted::text(&export.name);
        tracing::info!(op, %name, %peer, reason = %refusal, "refused by the export's access rules");
    }
    true
}

/// Handles one option, appending the replies to `out`.
fn handle_option(
    option: u32,
    data: &[u8],
    state: &mut State,
    exports: &Exports,
    peer: &Peer,
    log: &mut ClientLog,
    out: &mut Vec<u8>,
) -> Step {
    let refused = |op: &str, export: &Export, log: &mut ClientLog| refused(op, export, peer, log);
    let error = |out: &mut Vec<u8>, kind: u32, message: &str| {
        option_reply(out, option, kind, message.as_bytes());
        Step::Continue
    };
    if state.tls_forced() && !matches!(option, OPT_STARTTLS | OPT_ABORT) {
        // FORCEDTLS: nothing is revealed or chosen before TLS.
        let op = option_name(option);
        if option == OPT_EXPORT_NAME {
            // No error path exists for EXPORT_NAME: the spec says to terminate.
            if log.admit() {
                tracing::info!(op, "TLS required: EXPORT_NAME before STARTTLS, closing");
            }
            return Step::Close;
        }
        if log.admit() {
            tracing::info!(op, "TLS required: option before STARTTLS refused");
        }
        return error(
            out,
            REP_ERR_TLS_REQD,
            "TLS is required: send STARTTLS first",
        );
    }
    match option {
        OPT_EXPORT_NAME => {
            if state.extended {
                tracing::info!("EXPORT_NAME after EXTENDED_HEADERS is forbidden, closing");
                return Step::Close;
            }
            let Some(export) = std::str::from_utf8(data)
                .ok()
                .and_then(|name| exports.get(name))
            else {
                // No error path exists for EXPORT_NAME: the spec says to close.
                tracing::info!(name = %Untrusted::bytes(data), "unknown export, closing");
                return Step::Close;
            };
            if state.needs_tls(export) {
                if log.admit() {
                    let name = Untrusted::text(&export.name);
                    tracing::info!(op = "EXPORT_NAME", %name, "export requires TLS, closing");
                }
                return Step::Close;
            }
            // EXPORT_NAME has no error reply either.
            if refused("EXPORT_NAME", export, log) {
                return Step::Close;
            }
            let flags = state.capabilities(export).transmission_flags();
            out.extend(handshake::export_name_reply(
                export.size(),
                flags,
                state.no_zeroes,
            ));
            Step::Transmit(Arc::clone(export))
        }
        OPT_ABORT => {
            option_reply(out, option, REP_ACK, &[]);
            Step::Close
        }
        OPT_LIST => {
            if !data.is_empty() {
                return error(out, REP_ERR_INVALID, "LIST takes no data");
            }
            // Only what this peer may use: the others are not revealed, and neither are
            // exports that need TLS before TLS is up (SELECTIVETLS allows hiding them).
            let shown = |e: &&Arc<Export>| !state.needs_tls(e) && e.access.check(peer).is_ok();
            for export in exports.iter().filter(shown) {
                let entry = handshake::server_entry(&export.name, &export.description);
                option_reply(out, option, REP_SERVER, &entry);
            }
            option_reply(out, option, REP_ACK, &[]);
            Step::Continue
        }
        OPT_STARTTLS => {
            if state.tls_mode == TlsMode::Off {
                // NOTLS: never ERR_TLS_REQD.
                return error(out, REP_ERR_POLICY, "TLS is not available on this server");
            }
            if !data.is_empty() {
                return error(out, REP_ERR_INVALID, "STARTTLS takes no data");
            }
            if state.tls.is_some() {
                if log.admit() {
                    tracing::info!("STARTTLS over TLS refused");
                }
                return error(out, REP_ERR_INVALID, "TLS is already established");
            }
            option_reply(out, option, REP_ACK, &[]);
            Step::StartTls
        }
        OPT_INFO | OPT_GO => {
            let op = if option == OPT_GO { "GO" } else { "INFO" };
            let request = match handshake::parse_info_request(data) {
                Ok(request) => request,
                Err(err) => {
                    if log.admit() {
                        let name = Untrusted::bytes(handshake::requested_name(data));
                        tracing::info!(op, %name, reason = err.0, "malformed request, refused");
                    }
                    return error(out, REP_ERR_INVALID, err.0);
                }
            };
            let Some(export) = exports.get(&request.export) else {
                if log.admit() {
                    let name = Untrusted::text(&request.export);
                    tracing::info!(op, %name, "unknown export, refused");
                }
                return error(out, REP_ERR_UNKNOWN, "no export by that name");
            };
            if state.needs_tls(export) {
                if log.admit() {
                    let name = Untrusted::text(&export.name);
                    tracing::info!(op, %name, "export requires TLS: refused before STARTTLS");
                }
                return error(
                    out,
                    REP_ERR_TLS_REQD,
                    "this export requires TLS: use STARTTLS",
                );
            }
            if refused(op, export, log) {
                return error(out, REP_ERR_POLICY, "access to this export is not allowed");
            }
            let flags = state.capabilities(export).transmission_flags();
            option_reply(
                out,
                option,
                REP_INFO,
                &handshake::info_export(export.size(), flags),
            );
            if request.requested.contains(&INFO_NAME) {
                let info = handshake::info_text(INFO_NAME, &export.name);
                option_reply(out, option, REP_INFO, &info);
            }
            if request.requested.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
                let info = handshake::info_text(INFO_DESCRIPTION, &export.description);
                option_reply(out, option, REP_INFO, &info);
            }
            // Sent unasked too: clients that did not ask must ignore it, and those that do
            // get the real limits (any alignment, 4 KiB pages, 32 MiB payloads).
            option_reply(out, option, REP_INFO, &handshake::info_block_size());
            option_reply(out, option, REP_ACK, &[]);
            if option == OPT_GO {
                Step::Transmit(Arc::clone(export))
            } else {
                Step::Continue
            }
        }
        OPT_STRUCTURED_REPLY => {
            if !data.is_empty() {
                return error(out, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data");
            }
            if state.extended {
                return error(
                    out,
                    REP_ERR_INVALID,
                    "extended headers already imply structured replies",
                );
            }
            state.structured = true;
            option_reply(out, option, REP_ACK, &[]);
            Step::Continue
        }
        OPT_EXTENDED_HEADERS => {
            if !data.is_empty() {
                return error(out, REP_ERR_INVALID, "EXTENDED_HEADERS takes no data");
            }
            state.extended = true;
            option_reply(out, option, REP_ACK, &[]);
            Step::Continue
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let setting = option == OPT_SET_META_CONTEXT;
            if setting {
                // SET replaces earlier contexts even when it fails.
                state.meta_export = None;
                if !state.structured && !state.extended {
                    return error(out, REP_ERR_INVALID, "negotiate structured replies first");
                }
            }
            // Debug only: clients send SET_META_CONTEXT just before GO, which logs the name.
            let op = if setting {
                "SET_META_CONTEXT"
            } else {
                "LIST_META_CONTEXT"
            };
            let request = match handshake::parse_meta_context_request(data) {
                Ok(request) => request,
                Err(err) => {
                    let name = Untrusted::bytes(handshake::requested_name(data));
                    tracing::debug!(op, %name, reason = err.0, "malformed request, refused");
                    return error(out, REP_ERR_INVALID, err.0);
                }
            };
            // An export that needs TLS is hidden before TLS, as in LIST.
            let Some(export) = exports.get(&request.export).filter(|e| !state.needs_tls(e)) else {
                let name = Untrusted::text(&request.export);
                tracing::debug!(op, %name, "unknown export, refused");
                return error(out, REP_ERR_UNKNOWN, "no export by that name");
            };
            if refused(op, export, log) {
                return error(out, REP_ERR_POLICY, "access to this export is not allowed");
            }
            if handshake::selects_base_allocation(&request.queries, !setting) {
                let id = if setting { BASE_ALLOCATION_ID } else { 0 };
                option_reply(
                    out,
                    option,
                    REP_META_CONTEXT,
                    &handshake::meta_context(id, BASE_ALLOCATION),
                );
                if setting {
                    state.meta_export = Some(request.export);
                }
            }
            option_reply(out, option, REP_ACK, &[]);
            Step::Continue
        }
        _ => error(out, REP_ERR_UNSUP, "option not supported"),
    }
}

/// An option's name for log lines.
fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "EXPORT_NAME",
        OPT_ABORT => "ABORT",
        OPT_LIST => "LIST",
        OPT_STARTTLS => "STARTTLS",
        OPT_INFO => "INFO",
        OPT_GO => "GO",
        OPT_STRUCTURED_REPLY => "STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "EXTENDED_HEADERS",
        _ => "unknown",
    }
}
