//! Network namespaces as client hosts: each [`ClientHost`] is a namespace joined to the test's
//! own (root) namespace by a veth pair on a /24 of its own, `10.200.N.0/24`: the host side is
//! `10.200.N.1`, the client `10.200.N.2`. A server listening on `0.0.0.0` in the root namespace
//! is reached from the client at `10.200.N.1` and sees the client as `10.200.N.2`: real,
//! distinct source addresses. Needs root and `ip` (iproute2).
//!
//! Dropping the host deletes the namespace, and the veth pair with it, so a failing test
//! leaves nothing behind. Names carry the test process's id, so that parallel test processes
//! do not collide; subnets are the caller's to keep apart within one process.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::process::Command;

use crate::tools::{require_tool, run_ok};

/// A network namespace standing for one client host.
#[derive(Debug)]
pub struct ClientHost {
    name: String,
    /// The veth end in the root namespace.
    host_link: String,
    /// The veth end inside the namespace.
    client_link: String,
    subnet: u8,
}

impl ClientHost {
    /// Creates namespace `tag` (short, such as "a") on `10.200.subnet.0/24`.
    pub fn new(tag: &str, subnet: u8) -> ClientHost {
        require_tool("ip", "iproute2");
        let pid = std::process::id() % 100_000;
        let host = ClientHost {
            name: format!("ramnbd-{tag}-{pid}"),
            // Interface names are at most 15 bytes.
            host_link: format!("rn{tag}{pid}h"),
            client_link: format!("rn{tag}{pid}c"),
            subnet,
        };
        // A namespace left over by a killed run of this very process id would fail `add`.
        let _ = Command::new("ip")
            .args(["netns", "del", &host.name])
            .output();
        run_ok("ip", &["netns", "add", &host.name]);
        // From here on, dropping `host` cleans up whatever was made.
        run_ok(
            "ip",
            &[
                "link",
                "add",
                &host.host_link,
                "type",
                "veth",
                "peer",
                "name",
                &host.client_link,
                "netns",
                &host.name,
            ],
        );
        let host_cidr = format!("{}/24", host.host_ip());
        let client_cidr = format!("{}/24", host.client_ip());
        run_ok("ip", &["addr", "add", &host_cidr, "dev", &host.host_link]);
        run_ok("ip", &["link", "set", &host.host_link, "up"]);
        let ns = host.name.as_str();
        run_ok(
            "ip",
            &[
                "-n",
                ns,
                "addr",
                "add",
                &client_cidr,
                "dev",
                &host.client_link,
            ],
        );
        run_ok("ip", &["-n", ns, "link", "set", &host.client_link, "up"]);
        run_ok("ip", &["-n", ns, "link", "set", "lo", "up"]);
        host
    }

    /// The root namespace's address on this host's link: where the client reaches the server.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, self.subnet, 1)
    }

    /// The client's address, as the server sees it.
    pub fn client_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, self.subnet, 2)
    }

    /// The client's network, for allow rules.
    pub fn subnet(&self) -> String {
        format!("10.200.{}.0/24", self.subnet)
    }

    /// A command that runs `program ARGS` inside the namespace (`ip netns exec`).
    pub fn command<S: AsRef<OsStr>>(&self, program: impl AsRef<OsStr>, args: &[S]) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.name])
            .arg(program)
            .args(args);
        command
    }

    /// `command` (such as one from [`crate::Clients::command`]), run inside the namespace.
    pub fn wrap(&self, command: &Command) -> Command {
        let mut wrapped = Command::new("ip");
        wrapped
            .args(["netns", "exec", &self.name])
            .arg(command.get_program())
            .args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        wrapped
    }

    /// Cuts the link as a vanished host would: the client's end goes down, so nothing the
    /// server sends arrives and nothing comes back; no RST, no FIN.
    pub fn cut_link(&self) {
        run_ok(
            "ip",
            &["-n", &self.name, "link", "set", &self.client_link, "down"],
        );
    }
}

impl Drop for ClientHost {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and the pair with it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_link])
            .output();
    }
}
