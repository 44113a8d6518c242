//! Access control with real clients and real addresses: network namespaces as client hosts
//! (see `ramnbd_client_tests::netns`), each with a source address of its own, for the
//! server-wide allow list, per-export network rules, TCP keepalive against a vanished host and
//! the per-address connection cap; Unix-socket clients run as other uids and gids for the
//! credential rules; the raw client for the exact replies; and the per-connection cap on log
//! lines a client can provoke.
//!
//! Needs root (namespaces, setpriv). Subnets 10.200.10-19.0/24 are this file's.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use ramnbd_client_tests::netns::ClientHost;
use ramnbd_client_tests::proto::*;
use ramnbd_client_tests::tools::run_command;
use ramnbd_client_tests::{Clients, Negotiate, RawClient, Server, both_generations};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Lines of `log` that contain every one of `needles`.
fn lines_with<'a>(log: &'a str, needles: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|line| needles.iter().all(|n| line.contains(n)))
        .collect()
}

/// The server on every address (`0.0.0.0`), so that namespaces reach it on their link.
fn start_on_all_addresses(args: &[&str]) -> (Server, u16) {
    let mut all = vec!["-l", "0.0.0.0:0"];
    all.extend_from_slice(args);
    let server = Server::start(&all);
    // The first "listening on tcp" line is the first -l: ours.
    let port = server.tcp_addr().port();
    assert!(server.tcp_addr().ip().is_unspecified());
    (server, port)
}

fn nbdinfo_in<S: AsRef<std::ffi::OsStr>>(
    host: &ClientHost,
    clients: Clients,
    args: &[S],
) -> std::process::Output {
    let mut command = clients.command("nbdinfo");
    command.args(args);
    run_command(&mut host.wrap(&command))
}

/// nbdinfo's arguments for an export that should be refused: libnbd 1.14's plain nbdinfo shows
/// ERR_POLICY from INFO as "Operation not supported", while with --size (GO) it names the
/// policy; 1.22's --size hides the error behind "has not returned export size", its plain run
/// names the policy.
fn refusal_args(clients: Clients, uri: &str) -> Vec<String> {
    match clients {
        Clients::Debian12 => vec!["--size".to_owned(), uri.to_owned()],
        Clients::Debian13 => vec![uri.to_owned()],
    }
}

/// What each generation's nbdinfo says for NBD_REP_ERR_POLICY.
fn assert_policy_refusal(clients: Clients, output: &std::process::Output) {
    let said = match clients {
        Clients::Debian12 => "server policy prevents NBD_OPT_GO",
        Clients::Debian13 => {
            "server policy prevents the operation: access to this export is not allowed"
        }
    };
    assert!(stderr(output).contains(said), "{}", stderr(output));
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The server-wide list: a client from the allowed host is served, one from the other host is
/// closed before the greeting, and the refusal is logged once for its address however often
/// it tries.
fn the_allow_list_serves_one_host_and_closes_the_other_before_the_greeting(clients: Clients) {
    let (a, b) = match clients {
        Clients::Debian12 => (10, 11),
        Clients::Debian13 => (12, 13),
    };
    let allowed = ClientHost::new(&format!("l{a}"), a);
    let refused = ClientHost::new(&format!("l{b}"), b);
    let (server, port) = start_on_all_addresses(&["-s", "16M", "--allow", &allowed.subnet()]);

    let uri = format!("nbd://{}:{port}/", allowed.host_ip());
    let served = nbdinfo_in(&allowed, clients, &["--size", &uri]);
    assert!(served.status.success(), "{}", stderr(&served));
    assert_eq!(stdout(&served).trim(), "16777216");

    let uri = format!("nbd://{}:{port}/", refused.host_ip());
    for attempt in 0..3 {
        let output = nbdinfo_in(&refused, clients, &["--size", &uri]);
        assert!(!output.status.success(), "attempt {attempt} was served");
        // Closed before the greeting: the client never saw an NBD server.
        assert!(
            stderr(&output).contains("server disconnected unexpectedly"),
            "attempt {attempt}: {}",
            stderr(&output)
        );
    }
    let needle = format!(
        "{} is not in the allowed client networks: closed before the greeting",
        refused.client_ip()
    );
    server.wait_for_stderr(&needle, TIMEOUT);
    let log = server.stderr_text();
    let lines = lines_with(&log, &[&needle]);
    assert_eq!(lines.len(), 1, "three refusals, one line:\n{log}");
    eprintln!("refusal line: {}", lines[0]);
    assert!(
        lines_with(
            &log,
            &[&allowed.client_ip().to_string(), "not in the allowed"]
        )
        .is_empty(),
        "{log}"
    );
}

both_generations!(the_allow_list_serves_one_host_and_closes_the_other_before_the_greeting);

/// A dual-stack listener (`[::]`) sees IPv4 clients as IPv4-mapped IPv6 addresses
/// (`::ffff:10.200.22.2`); the IPv4 rules still apply to them, and the log shows the IPv4
/// address.
#[test]
fn ipv4_clients_of_a_dual_stack_listener_match_ipv4_rules() {
    let allowed = ClientHost::new("d22", 22);
    let refused = ClientHost::new("d23", 23);
    let export = format!("mine=4M,allow={}", allowed.subnet());
    let server = Server::start(&[
        "-l",
        "[::]:0",
        "--allow",
        &allowed.subnet(),
        "--allow",
        &refused.subnet(),
        "-e",
        &export,
        "-e",
        "other=8M,allow=10.200.99.0/24",
    ]);
    assert!(server.tcp_addr().is_ipv6(), "{}", server.tcp_addr());
    let port = server.tcp_addr().port();
    let list = nbdinfo_in(
        &allowed,
        Clients::Debian12,
        &[
            "--list",
            "--json",
            &format!("nbd://{}:{port}", allowed.host_ip()),
        ],
    );
    assert!(list.status.success(), "{}", stderr(&list));
    let json: serde_json::Value = serde_json::from_slice(&list.stdout).expect("JSON");
    let names: Vec<&str> = json["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| e["export-name"].as_str().expect("a name"))
        .collect();
    assert_eq!(names, ["mine"]);
    let uri = format!("nbd://{}:{port}/mine", refused.host_ip());
    let output = nbdinfo_in(&refused, Clients::Debian12, &["--size", &uri]);
    assert!(!output.status.success());
    assert_policy_refusal(Clients::Debian12, &output);
    let needle = format!("op=\"GO\" name=\"mine\" peer={} ", refused.client_ip());
    server.wait_for_stderr(&needle, TIMEOUT);
    assert!(
        !server.stderr_text().contains("::ffff:"),
        "{}",
        server.stderr_text()
    );
}

/// Per-export network rules: each host's LIST shows only the exports it may use; the other
/// export is refused with ERR_POLICY.
fn export_networks_show_and_refuse_per_host(clients: Clients) {
    let (a, b) = match clients {
        Clients::Debian12 => (14, 15),
        Clients::Debian13 => (16, 17),
    };
    let host_a = ClientHost::new(&format!("e{a}"), a);
    let host_b = ClientHost::new(&format!("e{b}"), b);
    let for_a = format!("for-a=16M,allow={}", host_a.subnet());
    let for_b = format!("for-b=32M,allow={}", host_b.subnet());
    let (server, port) = start_on_all_addresses(&["-e", &for_a, "-e", &for_b, "-e", "open=8M"]);

    for (host, mine, other) in [(&host_a, "for-a", "for-b"), (&host_b, "for-b", "for-a")] {
        let base = format!("nbd://{}:{port}", host.host_ip());
        let list = nbdinfo_in(host, clients, &["--list", "--json", &base]);
        assert!(list.status.success(), "{}", stderr(&list));
        let json: serde_json::Value = serde_json::from_slice(&list.stdout).expect("JSON");
        let mut names: Vec<&str> = json["exports"]
            .as_array()
            .expect("exports")
            .iter()
            .map(|e| e["export-name"].as_str().expect("a name"))
            .collect();
        names.sort();
        let mut expected = vec![mine, "open"];
        expected.sort();
        assert_eq!(names, expected, "{} lists", host.client_ip());

        let served = nbdinfo_in(host, clients, &["--size", &format!("{base}/{mine}")]);
        assert!(served.status.success(), "{}", stderr(&served));
        let uri = format!("{base}/{other}");
        let refused = nbdinfo_in(host, clients, &refusal_args(clients, &uri));
        assert!(
            !refused.status.success(),
            "{other} served to {}",
            host.client_ip()
        );
        assert_policy_refusal(clients, &refused);
        // The GO line is the last a refused nbdinfo provokes: wait for it itself.
        let needle = format!("op=\"GO\" name=\"{other}\" peer={}", host.client_ip());
        server.wait_for_stderr(&needle, TIMEOUT);
        let log = server.stderr_text();
        let go = ["refused by the export's access rules", "op=\"GO\"", &needle];
        let line = lines_with(&log, &go);
        assert!(!line.is_empty(), "{log}");
        eprintln!("refusal line: {}", line[0]);
    }
}

both_generations!(export_networks_show_and_refuse_per_host);

/// The exact replies, from the raw client (a TCP peer 127.0.0.1, outside the export's network):
/// ERR_POLICY for INFO, GO and the meta context options, a close for EXPORT_NAME, and a LIST
/// without the export; the open export still works on the same connection.
#[test]
fn a_refused_export_gets_err_policy_and_is_not_listed() {
    let server = Server::start(&["-e", "private=16M,allow=10.200.18.0/24", "-e", "open=4M"]);
    let mut client = RawClient::connect(&server.tcp());
    client.read_greeting();
    client.send_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    let listed = client.opt_list().expect("LIST");
    let names: Vec<&str> = listed.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["open"]);
    let info = client.opt_info("private", &[]).unwrap_err();
    assert_eq!(info.rep, REP_ERR_POLICY, "{info:?}");
    assert_eq!(info.option, OPT_INFO);
    assert_eq!(info.data, b"access to this export is not allowed");
    assert_eq!(client.opt_structured_reply().rep, REP_ACK);
    let meta = client.opt_list_meta_context("private", &["base:allocation"]);
    assert_eq!(meta.unwrap_err().rep, REP_ERR_POLICY);
    let meta = client.opt_set_meta_context("private", &["base:allocation"]);
    assert_eq!(meta.unwrap_err().rep, REP_ERR_POLICY);
    let go = client.opt_go("private", &[]).unwrap_err();
    assert_eq!(go.rep, REP_ERR_POLICY, "{go:?}");
    let go = client.opt_go("open", &[]).expect("GO open");
    assert_eq!(go.size, 4 << 20);
    client.write(0, b"still served").expect("write");

    // EXPORT_NAME has no error reply: closed, with nothing sent.
    let mut client = RawClient::connect(&server.tcp());
    client.read_greeting();
    client.send_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    client.send_option(OPT_EXPORT_NAME, b"private");
    assert_eq!(client.expect_closed(TIMEOUT), Ok(()));

    server.wait_for_stderr("op=\"EXPORT_NAME\"", TIMEOUT);
    let log = server.stderr_text();
    for op in [
        "INFO",
        "GO",
        "LIST_META_CONTEXT",
        "SET_META_CONTEXT",
        "EXPORT_NAME",
    ] {
        let op = format!("op=\"{op}\"");
        let found = lines_with(
            &log,
            &[
                "refused by the export's access rules",
                &op,
                "name=\"private\" peer=127.0.0.1",
            ],
        );
        assert_eq!(found.len(), 1, "{op}:\n{log}");
    }
}

/// The socket as another user can use it: the directory searchable, the socket writable.
fn open_socket_to_all(server: &Server) {
    let path = server.unix_path();
    let dir = path.parent().expect("a directory");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).expect("chmod sock");
}

/// `nbdinfo ARGS` as uid:gid (no supplementary groups), of this generation.
fn nbdinfo_as<S: AsRef<std::ffi::OsStr>>(
    clients: Clients,
    uid: u32,
    gid: u32,
    args: &[S],
) -> std::process::Output {
    let mut command = clients.command("setpriv");
    command
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg("nbdinfo")
        .args(args);
    clients.command("nbdinfo"); // checks nbdinfo is there, and reports its version
    run_command(&mut command)
}

/// Unix-socket credentials: uid and gid rules admit root, a member of group 100 (as primary
/// gid), and refuse nobody with ERR_POLICY; a network-only export refuses Unix peers; LIST
/// shows each user what it may use.
fn unix_peers_are_judged_by_uid_and_gid(clients: Clients) {
    let server = Server::start(&[
        "-e",
        "root-only=16M,allow-uid=0",
        "-e",
        "group-100=8M,allow-gid=100,allow-uid=0",
        "-e",
        "network-only=4M,allow=10.0.0.0/8",
    ]);
    open_socket_to_all(&server);
    let uri = |name: &str| server.unix_uri(name);
    let list = |uid, gid| {
        let output = nbdinfo_as(clients, uid, gid, &["--list", "--json", &uri("")]);
        assert!(output.status.success(), "{}", stderr(&output));
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
        let mut names: Vec<String> = json["exports"]
            .as_array()
            .expect("exports")
            .iter()
            .map(|e| e["export-name"].as_str().expect("a name").to_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(list(0, 0), ["group-100", "root-only"]);
    assert_eq!(list(65534, 100), ["group-100"]);
    assert!(list(65534, 65534).is_empty());

    let size = |uid, gid, name: &str| nbdinfo_as(clients, uid, gid, &["--size", &uri(name)]);
    let root = size(0, 0, "root-only");
    assert!(root.status.success(), "{}", stderr(&root));
    assert_eq!(stdout(&root).trim(), "16777216");
    let member = size(65534, 100, "group-100");
    assert!(member.status.success(), "{}", stderr(&member));
    assert_eq!(stdout(&member).trim(), "8388608");

    for (uid, gid, name) in [
        (65534, 65534, "root-only"),
        (65534, 100, "root-only"),
        (65534, 65534, "group-100"),
        (0, 0, "network-only"),
    ] {
        let output = nbdinfo_as(clients, uid, gid, &refusal_args(clients, &uri(name)));
        assert!(!output.status.success(), "{name} served to {uid}:{gid}");
        assert_policy_refusal(clients, &output);
    }
    server.wait_for_stderr("op=\"GO\" name=\"network-only\"", TIMEOUT);
    let log = server.stderr_text();
    let nobody = lines_with(
        &log,
        &[
            "refused by the export's access rules op=\"GO\" name=\"root-only\"",
            "peer=uid 65534 gid 65534 pid ",
            "reason=uid and gid not in the export's allow-uid/allow-gid",
        ],
    );
    assert_eq!(nobody.len(), 1, "{log}");
    eprintln!("refusal line: {}", nobody[0]);
    let root_on_network_only = lines_with(
        &log,
        &[
            "op=\"GO\" name=\"network-only\" peer=uid 0 gid 0",
            "admits only TCP peers",
        ],
    );
    assert_eq!(root_on_network_only.len(), 1, "{log}");
    eprintln!("refusal line: {}", root_on_network_only[0]);
}

both_generations!(unix_peers_are_judged_by_uid_and_gid);

/// The raw client over the Unix socket (as root) for the exact reply to a Unix peer of an
/// export with only uid rules for others, and one with network rules only.
#[test]
fn a_unix_peer_gets_err_policy_from_a_network_only_export() {
    let server = Server::start(&[
        "-e",
        "net=4M,allow=10.0.0.0/8",
        "-e",
        "nobody=4M,allow-uid=65534",
    ]);
    let mut client = RawClient::connect(&server.unix());
    client.read_greeting();
    client.send_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    assert!(client.opt_list().expect("LIST").is_empty());
    for name in ["net", "nobody"] {
        let reply = client.opt_go(name, &[]).unwrap_err();
        assert_eq!(reply.rep, REP_ERR_POLICY, "{name}: {reply:?}");
    }
    // Over TCP the uid-only export is refused as well: it admits Unix peers only.
    let mut client = RawClient::connect(&server.tcp());
    client.read_greeting();
    client.send_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    let reply = client.opt_go("nobody", &[]).unwrap_err();
    assert_eq!(reply.rep, REP_ERR_POLICY, "{reply:?}");
    server.wait_for_stderr("admits only Unix-socket peers", TIMEOUT);
}

/// A Python libnbd client in `host` that connects to `uri` and then holds the connection open
/// until its stdin closes; returns once it has connected.
fn hold_connections(host: &ClientHost, uri: &str, count: usize) -> (std::process::Child, String) {
    const SCRIPT: &str = r#"
import sys, nbd
uri, count = sys.argv[1], int(sys.argv[2])
handles, results = [], []
for i in range(count):
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        handles.append(h)
        results.append("ok")
    except nbd.Error as e:
        results.append("failed")
print(" ".join(results), flush=True)
sys.stdin.read()
"#;
    Clients::Debian12.command(ramnbd_client_tests::clients::PYTHON);
    let mut child = host
        .command(
            ramnbd_client_tests::clients::PYTHON,
            &["-c", SCRIPT, uri, &count.to_string()],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start python3");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the results");
    (child, line.trim().to_owned())
}

fn release(mut child: std::process::Child) {
    drop(child.stdin.take());
    let _ = child.wait();
}

/// TCP keepalive: a client host whose link is cut (no FIN, no RST, nothing comes back) has its
/// connection closed by the server within idle × (1 + probes) = 2 s × 4 = 8 s; it stays open
/// while the link is up.
#[test]
fn keepalive_closes_the_connection_of_a_host_whose_link_was_cut() {
    let host = ClientHost::new("k", 19);
    let (server, port) = start_on_all_addresses(&["-s", "16M", "--tcp-keepalive", "2s"]);
    let uri = format!("nbd://{}:{port}/", host.host_ip());
    let (client, result) = hold_connections(&host, &uri, 1);
    assert_eq!(result, "ok");
    let peer = format!("conn{{peer={}:", host.client_ip());
    server.wait_for_stderr("transmission started", TIMEOUT);
    // Idle for longer than the whole keepalive bound with the link up: the probes are answered.
    std::thread::sleep(Duration::from_secs(9));
    let log = server.stderr_text();
    assert!(
        lines_with(&log, &[&peer, "connection dropped"]).is_empty(),
        "closed while the link was up:\n{log}"
    );

    host.cut_link();
    let cut = Instant::now();
    server.wait_for_stderr("connection dropped", Duration::from_secs(30));
    let log = server.stderr_text();
    let after = cut.elapsed();
    let line = lines_with(&log, &[&peer, "connection dropped"])[0];
    eprintln!("keepalive: closed {after:?} after the link was cut: {line}");
    assert!(line.contains("timed out"), "{line}");
    // 2 s idle (less what had passed since the last answered probe) + 3 probes 2 s apart.
    assert!(after >= Duration::from_secs(4), "{after:?}: too early");
    assert!(
        after <= Duration::from_secs(8) + Duration::from_secs(7),
        "{after:?}: too late"
    );
    release(client);
}

/// The per-address cap with real addresses: one host's third connection is closed before the
/// greeting while another host, with the same cap, is served.
#[test]
fn the_per_address_cap_counts_each_host_apart() {
    let a = ClientHost::new("ca", 20);
    let b = ClientHost::new("cb", 21);
    let (server, port) =
        start_on_all_addresses(&["-s", "16M", "--max-connections-per-client", "2"]);
    let (held, result) = hold_connections(&a, &format!("nbd://{}:{port}/", a.host_ip()), 3);
    assert_eq!(result, "ok ok failed");
    let (other, result) = hold_connections(&b, &format!("nbd://{}:{port}/", b.host_ip()), 2);
    assert_eq!(
        result, "ok ok",
        "the other host shares no count with the first"
    );
    let needle = format!(
        "{} holds max-connections-per-client (2) connections",
        a.client_ip()
    );
    server.wait_for_stderr(&needle, TIMEOUT);
    let log = server.stderr_text();
    eprintln!("cap line: {}", lines_with(&log, &[&needle])[0]);
    assert!(lines_with(&log, &[&b.client_ip().to_string(), "holds max-connections"]).is_empty());
    release(held);
    release(other);
    // Released: the first host is served again.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (again, result) = hold_connections(&a, &format!("nbd://{}:{port}/", a.host_ip()), 2);
        release(again);
        if result == "ok ok" {
            break;
        }
        assert!(Instant::now() < deadline, "slots not freed: {result}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One connection that asks for unknown exports again and again provokes at most 16 lines,
/// then one line with the count of those suppressed; other connections have their own budget.
#[test]
fn a_client_provokes_a_bounded_number_of_log_lines() {
    let server = Server::start(&["-s", "1M"]);
    let mut client = RawClient::connect(&server.unix());
    client.read_greeting();
    client.send_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    for i in 0..200 {
        let reply = client.opt_info(&format!("nope-{i}"), &[]).unwrap_err();
        assert_eq!(reply.rep, REP_ERR_UNKNOWN);
    }
    assert_eq!(client.opt_abort().rep, REP_ACK);
    server.wait_for_stderr("suppressed", TIMEOUT);
    let log = server.stderr_text();
    assert_eq!(
        lines_with(&log, &["unknown export, refused"]).len(),
        16,
        "{log}"
    );
    let summary = lines_with(
        &log,
        &["184 more lines about this client's options suppressed"],
    );
    assert_eq!(summary.len(), 1, "{log}");
    eprintln!("summary line: {}", summary[0]);
    // The next connection is not silenced by the first.
    let mut next = Negotiate::new("").go(&server.unix());
    next.write(0, b"x").expect("write");
    let mut other = RawClient::connect(&server.unix());
    other.read_greeting();
    other.send_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    other.opt_info("nope-other", &[]).unwrap_err();
    server.wait_for_stderr("nope-other", TIMEOUT);
}
