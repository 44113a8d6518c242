//! Access control: who a connection's peer is ([`Peer`]) and the rules that admit it, for the
//! whole server ([`ServerAccess`]: allowed client networks, decided before the greeting) and
//! per export ([`ExportAccess`]: networks, Unix-socket uids and gids, TLS identities, decided
//! before the export is revealed or opened).
//!
//! The rules, as docs/operations.md ("Access control") states them for operators:
//!
//! * A rule kind that is not set does not restrict. An export with no rules is open to every
//!   peer the server admits.
//! * Network rules (`allow`) are for TCP peers, credential rules (`allow-uid`, `allow-gid`) for
//!   Unix-socket peers. An export that sets rules for only one kind of peer is limited to that
//!   kind: with only `allow` rules it refuses Unix-socket peers, with only `allow-uid`/`allow-gid`
//!   rules it refuses TCP peers. To admit both, give both (each peer is then checked against its
//!   own kind's rules). This is the safe reading: a rule never widens access by not applying.
//! * `allow-uid` and `allow-gid` together admit a Unix peer whose uid is listed *or* whose
//!   (primary, from `SO_PEERCRED`) gid is listed.
//! * Identity rules (`allow-identity`) apply to every peer on top of the above: the peer must
//!   have a verified TLS client certificate whose identity is listed. Without TLS, no peer has
//!   one, so such an export refuses everybody.
//! * The server-wide `allow` list applies to TCP peers only; the Unix socket's file permissions
//!   decide which local users may connect at all.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`, what a dual-stack `[::]` listener reports
//! for IPv4 clients) are matched as the IPv4 address they carry.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use ipnet::IpNet;

use crate::logsafe::Untrusted;

/// Who is at the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub kind: PeerKind,
    /// The identity of a verified TLS client certificate (its subject CN); `None` until TLS
    /// has verified one.
    pub tls_identity: Option<String>,
}

/// The transport's view of the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// A TCP client, by its address (IPv4-mapped IPv6 addresses already made IPv4).
    Tcp(IpAddr),
    /// A Unix-socket client, by the credentials the kernel recorded when it connected
    /// (`SO_PEERCRED`).
    Unix {
        uid: u32,
        gid: u32,
        pid: Option<i32>,
    },
    /// A Unix-socket client whose credentials could not be read: no credential rule admits it.
    UnixUnknown,
    /// A session without a socket (unit tests, in-memory streams): no rule admits it either.
    Unknown,
}

impl Peer {
    pub fn tcp(addr: IpAddr) -> Peer {
        Peer::of(PeerKind::Tcp(addr.to_canonical()))
    }

    pub fn unix(uid: u32, gid: u32, pid: Option<i32>) -> Peer {
        Peer::of(PeerKind::Unix { uid, gid, pid })
    }

    pub fn unknown() -> Peer {
        Peer::of(PeerKind::Unknown)
    }

    fn of(kind: PeerKind) -> Peer {
        Peer {
            kind,
            tls_identity: None,
        }
    }

    /// The TCP client's address, if it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        match self.kind {
            PeerKind::Tcp(addr) => Some(addr),
            _ => None,
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            PeerKind::Tcp(addr) => write!(f, "{addr}")?,
            PeerKind::Unix { uid, gid, pid } => {
                write!(f, "uid {uid} gid {gid}")?;
                if let Some(pid) = pid {
                    write!(f, " pid {pid}")?;
                }
            }
            PeerKind::UnixUnknown => f.write_str("unix peer (credentials unknown)")?,
            PeerKind::Unknown => f.write_str("unknown peer")?,
        }
        if let Some(identity) = &self.tls_identity {
            // The identity comes from the client's certificate: client-chosen text.
            write!(f, " identity {}", Untrusted::text(identity))?;
        }
        Ok(())
    }
}

/// An export's access rules (config keys `allow`, `allow-uid`, `allow-gid`, `allow-identity`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportAccess {
    pub networks: Vec<IpNet>,
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    pub identities: Vec<String>,
}

/// Why a peer was refused, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A TCP peer outside every allowed network.
    Network,
    /// A TCP peer of an export that only admits Unix-socket peers (uid/gid rules only).
    LocalOnly,
    /// A Unix peer whose uid and gid are both unlisted, or whose credentials are unknown.
    Credentials,
    /// A Unix peer of an export that only admits TCP peers (network rules only).
    NetworkOnly,
    /// No verified TLS identity, or one that is not listed.
    Identity,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::Network => "address not in the export's allow networks",
            Refusal::LocalOnly => "the export admits only Unix-socket peers (allow-uid/allow-gid)",
            Refusal::Credentials => "uid and gid not in the export's allow-uid/allow-gid",
            Refusal::NetworkOnly => "the export admits only TCP peers (allow networks)",
            Refusal::Identity => "no verified TLS identity in the export's allow-identity",
        })
    }
}

impl ExportAccess {
    /// No rule of any kind: everybody the server admits.
    pub fn is_open(&self) -> bool {
        self.networks.is_empty()
            && self.uids.is_empty()
            && self.gids.is_empty()
            && self.identities.is_empty()
    }

    /// Whether `peer` may see and use the export; see the module doc for the rules.
    pub fn check(&self, peer: &Peer) -> Result<(), Refusal> {
        let by_network = !self.networks.is_empty();
        let by_credentials = !self.uids.is_empty() || !self.gids.is_empty();
        if by_network || by_credentials {
            match peer.kind {
                PeerKind::Tcp(_) if !by_network => return Err(Refusal::LocalOnly),
                PeerKind::Tcp(addr) => {
                    if !in_networks(&self.networks, addr) {
                        return Err(Refusal::Network);
                    }
                }
                PeerKind::Unix { .. } | PeerKind::UnixUnknown if !by_credentials => {
                    return Err(Refusal::NetworkOnly);
                }
                PeerKind::Unix { uid, gid, .. } => {
                    if !self.uids.contains(&uid) && !self.gids.contains(&gid) {
                        return Err(Refusal::Credentials);
                    }
                }
                PeerKind::UnixUnknown => return Err(Refusal::Credentials),
                PeerKind::Unknown if by_network => return Err(Refusal::Network),
                PeerKind::Unknown => return Err(Refusal::Credentials),
            }
        }
        if !self.identities.is_empty() {
            let listed = peer
                .tls_identity
                .as_ref()
                .is_some_and(|id| self.identities.contains(id));
            if !listed {
                return Err(Refusal::Identity);
            }
        }
        Ok(())
    }

    /// One line for `--check-config` and the start log: `all`, or the rules.
    pub fn describe(&self) -> String {
        if self.is_open() {
            return "all".to_owned();
        }
        let mut parts = Vec::new();
        let list = |items: Vec<String>| items.join(" ");
        if !self.networks.is_empty() {
            parts.push(format!(
                "tcp from {}",
                list(self.networks.iter().map(ToString::to_string).collect())
            ));
        }
        if !self.uids.is_empty() {
            parts.push(format!(
                "uid {}",
                list(self.uids.iter().map(ToString::to_string).collect())
            ));
        }
        if !self.gids.is_empty() {
            parts.push(format!(
                "gid {}",
                list(self.gids.iter().map(ToString::to_string).collect())
            ));
        }
        let transports = parts.join(" or ");
        let identities = (!self.identities.is_empty()).then(|| {
            let names: Vec<String> = self.identities.iter().map(|i| format!("{i:?}")).collect();
            format!("TLS identity {}", names.join(" "))
        });
        match (transports.is_empty(), identities) {
            (false, Some(ids)) => format!("{transports}, and {ids}"),
            (true, Some(ids)) => ids,
            (_, None) => transports,
        }
    }
}

fn in_networks(networks: &[IpNet], addr: IpAddr) -> bool {
    let addr = addr.to_canonical();
    networks.iter().any(|net| net.contains(&addr))
}

/// Parses one network rule: CIDR (`10.0.0.0/8`, `fd00::/8`) or a single address (`/32` or
/// `/128`). A network with host bits set (`10.1.2.3/8`) is refused: it is usually a typo for
/// one host or for the network, and silently reading it as either could open too much.
pub fn parse_network(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(addr.to_canonical()));
    }
    let net: IpNet = text.parse().map_err(|_| {
        "not an address or a network in CIDR form (such as \"10.0.0.0/8\", \"192.168.1.7\" \
         or \"fd00::/8\")"
            .to_owned()
    })?;
    if net.trunc() != net {
        return Err(format!(
            "has host bits set: the network is {}, one host is {}/{}",
            net.trunc(),
            net.addr(),
            net.max_prefix_len()
        ));
    }
    Ok(net)
}

/// The fix for a bad network rule, for config errors.
pub const NETWORK_FIX: &str = "write a network in CIDR form such as \"10.0.0.0/8\" or \
                               \"fd00::/8\" (network address, no host bits), or one address \
                               such as \"192.168.1.7\"";

/// Parses a numeric uid or gid.
pub fn parse_id(text: &str) -> Result<u32, String> {
    text.trim().parse::<u32>().map_err(|_| {
        "not a numeric id: give the number (`id -u NAME`, `getent group NAME`)".to_owned()
    })
}

/// Checks a TLS identity rule.
pub fn check_identity(text: &str) -> Result<(), String> {
    if text.is_empty() {
        Err("is empty: give the client certificate's subject CN".to_owned())
    } else {
        Ok(())
    }
}

/// The server-wide rule: the client networks that may connect at all (TCP only), and the log
/// of refusals, rate limited.
#[derive(Debug, Default)]
pub struct ServerAccess {
    networks: Vec<IpNet>,
    log: Mutex<RefusalLog>,
}

/// How often one address's refusals are logged: once, then again only after this long.
pub const REFUSED_ADDRESS_LOG_EVERY: Duration = Duration::from_secs(60);
/// At most this many refusal lines per [`REFUSED_WINDOW`] for all addresses together, so that
/// a flood from many addresses (an IPv6 /64 has plenty) cannot flood the log either.
pub const REFUSED_LINES_PER_WINDOW: u32 = 10;
pub const REFUSED_WINDOW: Duration = Duration::from_secs(10);
/// Addresses remembered for the per-address rate; beyond it the oldest half is forgotten.
const REFUSED_REMEMBERED: usize = 4096;

#[derive(Debug, Default)]
struct RefusalLog {
    last_logged: HashMap<IpAddr, tokio::time::Instant>,
    window_start: Option<tokio::time::Instant>,
    lines_in_window: u32,
    /// Refusals not logged since the last line.
    unlogged: u64,
}

impl ServerAccess {
    pub fn new(networks: Vec<IpNet>) -> ServerAccess {
        ServerAccess {
            networks,
            log: Mutex::default(),
        }
    }

    /// Whether `peer` may connect at all; a refusal is logged (rate limited).
    pub fn admit(&self, peer: &Peer) -> bool {
        let PeerKind::Tcp(addr) = peer.kind else {
            return true;
        };
        if self.networks.is_empty() || in_networks(&self.networks, addr) {
            return true;
        }
        self.log_refusal(addr, tokio::time::Instant::now());
        false
    }

    /// Logs a refusal of `addr` unless one was logged for it within
    /// [`REFUSED_ADDRESS_LOG_EVERY`] or the window's lines are spent; returns whether it did.
    fn log_refusal(&self, addr: IpAddr, now: tokio::time::Instant) -> bool {
        let mut log = self.log.lock().expect("never poisoned");
        let recent = log
            .last_logged
            .get(&addr)
            .is_some_and(|at| now.duration_since(*at) < REFUSED_ADDRESS_LOG_EVERY);
        if log
            .window_start
            .is_none_or(|start| now.duration_since(start) >= REFUSED_WINDOW)
        {
            log.window_start = Some(now);
            log.lines_in_window = 0;
        }
        if recent || log.lines_in_window >= REFUSED_LINES_PER_WINDOW {
            log.unlogged += 1;
            return false;
        }
        if log.last_logged.len() >= REFUSED_REMEMBERED {
            let mut ages: Vec<_> = log.last_logged.values().copied().collect();
            ages.sort_unstable();
            let cutoff = ages[ages.len() / 2];
            log.last_logged.retain(|_, at| *at > cutoff);
        }
        log.last_logged.insert(addr, now);
        log.lines_in_window += 1;
        tracing::warn!(
            client = %addr,
            refused_unlogged = log.unlogged,
            "{addr} is not in the allowed client networks: closed before the greeting (each \
             address is logged at most every {}s, all at most {} lines every {}s)",
            REFUSED_ADDRESS_LOG_EVERY.as_secs(),
            REFUSED_LINES_PER_WINDOW,
            REFUSED_WINDOW.as_secs()
        );
        log.unlogged = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| parse_network(n).unwrap()).collect()
    }

    fn tcp(addr: &str) -> Peer {
        Peer::tcp(addr.parse().unwrap())
    }

    #[test]
    fn networks_parse_and_typos_are_refused() {
        assert_eq!(
            parse_network("10.0.0.0/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            parse_network("192.168.1.7").unwrap().to_string(),
            "192.168.1.7/32"
        );
        assert_eq!(parse_network("fd00::/8").unwrap().to_string(), "fd00::/8");
        assert_eq!(parse_network("::1").unwrap().to_string(), "::1/128");
        // A mapped address given alone is the IPv4 host it carries.
        assert_eq!(
            parse_network("::ffff:10.1.2.3").unwrap().to_string(),
            "10.1.2.3/32"
        );
        let err = parse_network("10.1.2.3/8").unwrap_err();
        assert!(
            err.contains("10.0.0.0/8") && err.contains("10.1.2.3/32"),
            "{err}"
        );
        assert!(parse_network("10.0.0.0/33").is_err());
        assert!(parse_network("10.0.0").is_err());
        assert!(parse_network("").is_err());
        assert!(parse_id("1000").is_ok());
        assert!(parse_id("-1").is_err() && parse_id("root").is_err());
    }

    #[test]
    fn the_server_list_admits_its_networks_and_mapped_addresses() {
        let access = ServerAccess::new(nets(&["10.200.1.0/24", "fd00::/8"]));
        assert!(access.admit(&tcp("10.200.1.9")));
        assert!(access.admit(&tcp("::ffff:10.200.1.9")));
        assert!(access.admit(&tcp("fd12::1")));
        assert!(!access.admit(&tcp("10.200.2.2")));
        assert!(!access.admit(&tcp("::ffff:10.200.2.2")));
        assert!(!access.admit(&tcp("127.0.0.1")));
        // Unix peers are not the network list's business.
        assert!(access.admit(&Peer::unix(65534, 65534, None)));
        // No list: everybody.
        assert!(ServerAccess::default().admit(&tcp("192.0.2.1")));
    }

    #[test]
    fn refusals_are_logged_once_per_address_and_a_few_per_window() {
        let access = ServerAccess::new(nets(&["10.0.0.0/8"]));
        let t0 = tokio::time::Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(access.log_refusal(a, t0));
        assert!(!access.log_refusal(a, t0 + Duration::from_secs(1)));
        // Many addresses: the window's lines, then silence until the next window.
        let logged = (0..100u8)
            .filter(|i| {
                let addr = IpAddr::from([198, 51, 100, *i]);
                access.log_refusal(addr, t0 + Duration::from_secs(2))
            })
            .count();
        assert_eq!(logged as u32, REFUSED_LINES_PER_WINDOW - 1);
        let later = t0 + REFUSED_WINDOW + Duration::from_secs(3);
        assert!(access.log_refusal(IpAddr::from([198, 51, 100, 200]), later));
        // The first address again, in a fresh window but within its own minute: silent.
        assert!(!access.log_refusal(a, t0 + Duration::from_secs(59)));
        assert!(access.log_refusal(a, t0 + REFUSED_ADDRESS_LOG_EVERY + REFUSED_WINDOW));
        assert_eq!(access.log.lock().unwrap().unlogged, 0);
    }

    #[test]
    fn export_rules_by_kind_of_peer() {
        let open = ExportAccess::default();
        assert!(open.check(&tcp("192.0.2.1")).is_ok());
        assert!(open.check(&Peer::unix(1, 1, None)).is_ok());
        assert!(open.check(&Peer::unknown()).is_ok());

        let net_only = ExportAccess {
            networks: nets(&["10.200.1.0/24"]),
            ..ExportAccess::default()
        };
        assert!(net_only.check(&tcp("10.200.1.2")).is_ok());
        assert_eq!(net_only.check(&tcp("10.200.2.2")), Err(Refusal::Network));
        assert_eq!(
            net_only.check(&Peer::unix(0, 0, None)),
            Err(Refusal::NetworkOnly)
        );

        let local_only = ExportAccess {
            uids: vec![0],
            gids: vec![6],
            ..ExportAccess::default()
        };
        assert!(local_only.check(&Peer::unix(0, 0, Some(1))).is_ok());
        assert!(local_only.check(&Peer::unix(1000, 6, None)).is_ok());
        assert_eq!(
            local_only.check(&Peer::unix(65534, 65534, None)),
            Err(Refusal::Credentials)
        );
        assert_eq!(
            local_only.check(&tcp("10.200.1.2")),
            Err(Refusal::LocalOnly)
        );
        let unknown = Peer::of(PeerKind::UnixUnknown);
        assert_eq!(local_only.check(&unknown), Err(Refusal::Credentials));

        let both = ExportAccess {
            networks: nets(&["10.200.1.0/24"]),
            uids: vec![0],
            ..ExportAccess::default()
        };
        assert!(both.check(&tcp("10.200.1.2")).is_ok());
        assert!(both.check(&Peer::unix(0, 0, None)).is_ok());
        assert_eq!(
            both.check(&Peer::unix(1, 1, None)),
            Err(Refusal::Credentials)
        );
    }

    #[test]
    fn identity_rules_need_a_verified_listed_identity_on_top() {
        let ids = ExportAccess {
            identities: vec!["client-a".to_owned()],
            ..ExportAccess::default()
        };
        let mut peer = tcp("10.200.1.2");
        assert_eq!(ids.check(&peer), Err(Refusal::Identity));
        peer.tls_identity = Some("client-b".to_owned());
        assert_eq!(ids.check(&peer), Err(Refusal::Identity));
        peer.tls_identity = Some("client-a".to_owned());
        assert!(ids.check(&peer).is_ok());

        let net_and_id = ExportAccess {
            networks: nets(&["10.200.1.0/24"]),
            ..ids.clone()
        };
        assert!(net_and_id.check(&peer).is_ok());
        let mut elsewhere = tcp("10.200.2.2");
        elsewhere.tls_identity = Some("client-a".to_owned());
        assert_eq!(net_and_id.check(&elsewhere), Err(Refusal::Network));
        assert_eq!(
            net_and_id.describe(),
            "tcp from 10.200.1.0/24, and TLS identity \"client-a\""
        );
    }

    #[test]
    fn peers_show_escaped_identities() {
        let mut peer = Peer::unix(0, 0, Some(42));
        assert_eq!(peer.to_string(), "uid 0 gid 0 pid 42");
        peer.tls_identity = Some("evil\nERROR forged".to_owned());
        assert!(!peer.to_string().contains('\n'), "{peer}");
    }
}
