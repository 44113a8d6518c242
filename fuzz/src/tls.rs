//! The option phase under TLS modes `on` and `require`, before STARTTLS, driven by a fuzzer's
//! bytes (TLS records themselves are rustls's to parse: STARTTLS here is acknowledged and the
//! connection closed, `Tls::without_credentials`).
//!
//! # Input
//! * byte 0: bit 0 picks the mode (0: `require`, 1: `on`), bit 1 prefixes correct client flags
//!   (fixed newstyle, no zeroes), so the fuzzer reaches the options at once;
//! * the rest: raw client bytes.
//!
//! # What is checked
//! The server has two exports: `open` (read-only, so no client bytes can be read back from
//! it) and `s3cr3t-export` with `tls=require`. Whatever the client sends:
//! * the session ends once the input is over (no hang, no busy loop) and never panics;
//! * the secret export's name appears nowhere in what the server sends (LIST hides it, INFO
//!   and GO refuse it, EXPORT_NAME for it closes), in either mode;
//! * under `require`, everything after the greeting is option replies, each one well framed
//!   and each `ERR_TLS_REQD`, except `ERR_TOO_BIG` for an oversized option, `ERR_INVALID` for
//!   STARTTLS with data, and the ACK of ABORT or STARTTLS, after which nothing follows.

use std::sync::Arc;
use std::time::Duration;

use ramnbd::config::ExportConfig;
use ramnbd::export::Exports;
use ramnbd::proto::consts::*;
use ramnbd::session::HandshakeOptions;
use ramnbd::shutdown::Shutdown;
use ramnbd::tls::{Tls, TlsMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The export only TLS clients may see.
pub const SECRET: &str = "s3cr3t-export";

/// Bits of the first byte.
pub const MODE_ON: u8 = 1;
pub const FLAGS_PREFIX: u8 = 2;

/// What the server sent, for the harness's own tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Under `require`: the reply types, in order.
    pub replies: Vec<u32>,
    pub output_len: usize,
}

pub fn run(data: &[u8]) -> Summary {
    let Some((&setup, raw)) = data.split_first() else {
        return Summary::default();
    };
    let mode = if setup & MODE_ON != 0 {
        TlsMode::On
    } else {
        TlsMode::Require
    };
    let mut input = Vec::new();
    if setup & FLAGS_PREFIX != 0 {
        input.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    }
    input.extend_from_slice(raw);
    let configs = [
        ExportConfig {
            name: "open".to_owned(),
            size: 1 << 20,
            read_only: true,
            ..Default::default()
        },
        ExportConfig {
            name: SECRET.to_owned(),
            size: 1 << 20,
            description: SECRET.to_owned(),
            tls_required: true,
            ..Default::default()
        },
    ];
    let exports = Arc::new(Exports::new(&configs).expect("create the exports"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let output = runtime.block_on(session(exports, &input, mode));
    check(&output, mode)
}

async fn session(exports: Arc<Exports>, input: &[u8], mode: TlsMode) -> Vec<u8> {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let (server_reader, server_writer) = tokio::io::split(server);
    let (mut client_reader, mut client_writer) = tokio::io::split(client);
    let server = async {
        ramnbd::session::serve_within(
            server_reader,
            server_writer,
            ramnbd::access::Peer::unknown(),
            &HandshakeOptions {
                deadline: None,
                tls: Tls::without_credentials(mode),
            },
            exports,
            Shutdown::new(),
            None,
        )
        .await
    };
    let client = async {
        // The server may close before reading everything: a failed write is fine.
        let _ = client_writer.write_all(input).await;
        let _ = client_writer.shutdown().await;
    };
    let reader = async {
        let mut output = Vec::new();
        let _ = client_reader.read_to_end(&mut output).await;
        output
    };
    let all = async { tokio::join!(server, client, reader) };
    let (handed_over, (), output) = tokio::time::timeout(Duration::from_secs(3600), all)
        .await
        .expect("the session did not end after the client's input was over");
    assert!(handed_over.is_none(), "no hand-over was asked for");
    output
}

fn check(output: &[u8], mode: TlsMode) -> Summary {
    assert!(
        !output.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
        "the TLS-only export was revealed without TLS: {output:02x?}"
    );
    let mut summary = Summary {
        output_len: output.len(),
        ..Summary::default()
    };
    if output.is_empty() {
        return summary;
    }
    assert!(output.len() >= 18, "a partial greeting: {output:02x?}");
    assert_eq!(&output[..8], &NBDMAGIC.to_be_bytes());
    if mode != TlsMode::Require {
        return summary;
    }
    let mut rest = &output[18..];
    while !rest.is_empty() {
        assert!(rest.len() >= 20, "a partial option reply: {rest:02x?}");
        let be32 = |at: usize| u32::from_be_bytes(rest[at..at + 4].try_into().unwrap());
        assert_eq!(
            &rest[..8],
            &OPTION_REPLY_MAGIC.to_be_bytes(),
            "not an option reply"
        );
        let (option, rep, len) = (be32(8), be32(12), be32(16) as usize);
        assert!(rest.len() >= 20 + len, "a truncated option reply");
        rest = &rest[20 + len..];
        summary.replies.push(rep);
        match rep {
            REP_ERR_TLS_REQD | REP_ERR_TOO_BIG => {}
            REP_ERR_INVALID => assert_eq!(option, OPT_STARTTLS, "ERR_INVALID only for STARTTLS"),
            REP_ACK => {
                assert!(
                    option == OPT_ABORT || option == OPT_STARTTLS,
                    "ACK for option {option} before TLS"
                );
                assert!(rest.is_empty(), "bytes after the final ACK: {rest:02x?}");
            }
            other => panic!("reply {other:#x} to option {option} before TLS under require"),
        }
    }
    summary
}
