use super::*;
use crate::config::{BackingChoice, MemoryConfig, parse_duration};
use crate::ramdisk::BackingKind;

fn parse_str(text: &str) -> Result<Config, ConfigError> {
    parse(Path::new("/etc/ramnbd/test.toml"), text)
}

fn error(text: &str) -> String {
    parse_str(text).unwrap_err().to_string()
}

#[test]
fn a_full_file() {
    let c = parse_str(
        r#"
[listen]
tcp = ["127.0.0.1:10809", "[::1]:10809"]
unix = ["/run/ramnbd/ramnbd.sock"]

[[export]]
name = "scratch"
size = "16G"
description = "scratch space"
max-memory = "8G"

[[export]]
name = "iso"
size = 4194304
read-only = true

[memory]
max-memory = "20G"
mlock = true
hugepages = true
backing = "memfd"

[logging]
level = "debug"

[metrics]
listen = "127.0.0.1:9109"

[server]
max-connections = 64
shutdown-grace = "2500ms"
"#,
    )
    .unwrap();
    assert_eq!(c.exports.len(), 2);
    assert_eq!(c.exports[0].size, 16 << 30);
    assert_eq!(c.exports[0].max_memory, Some(8 << 30));
    assert_eq!(c.exports[0].description, "scratch space");
    assert_eq!(c.exports[1].size, 4 << 20);
    assert!(c.exports[1].read_only);
    assert_eq!(
        c.listen,
        vec![
            ListenAddr::Tcp("127.0.0.1:10809".into()),
            ListenAddr::Tcp("[::1]:10809".into()),
            ListenAddr::Unix("/run/ramnbd/ramnbd.sock".into()),
        ]
    );
    assert_eq!(
        c.memory,
        MemoryConfig {
            max_memory: Some(20 << 30),
            mlock: true,
            hugepages: true,
            backing: BackingChoice::Memfd,
        }
    );
    assert_eq!(c.log_level.as_deref(), Some("debug"));
    assert_eq!(c.metrics.as_deref(), Some("127.0.0.1:9109"));
    assert_eq!(c.max_connections, 64);
    assert_eq!(c.shutdown_grace, Duration::from_millis(2500));
}

#[test]
fn an_empty_file_is_the_builtin_default() {
    let c = parse_str("# nothing\n").unwrap();
    let d = Config::builtin();
    assert_eq!(c.exports, d.exports);
    assert_eq!(c.listen, d.listen);
    assert_eq!(c.shutdown_grace, d.shutdown_grace);
}

#[test]
fn unknown_keys_name_the_line_the_key_and_the_allowed_ones() {
    let e = error("[[export]]\nname = \"a\"\nsize = \"1G\"\nsise = \"2G\"\n");
    assert!(
        e.starts_with("/etc/ramnbd/test.toml:4:1: export[0].sise: unknown field `sise`"),
        "{e}"
    );
    assert!(e.contains("`max-memory`"), "{e}");
    assert!(
        e.contains("fix: remove the key or correct its spelling"),
        "{e}"
    );
    assert!(e.contains("4 | sise = \"2G\""), "{e}");

    let e = error("[memmory]\nmlock = true\n");
    assert!(
        e.starts_with("/etc/ramnbd/test.toml:1:2: memmory: unknown field `memmory`"),
        "{e}"
    );
    let e = error("[server]\ngrace = 3\n");
    assert!(e.contains(":2:1: server.grace: unknown field"), "{e}");
}

#[test]
fn bad_sizes() {
    let e = error("[[export]]\nname = \"a\"\nsize = \"12Q\"\n");
    assert!(
        e.starts_with("/etc/ramnbd/test.toml:3:8: export[0].size: bad size \"12Q\""),
        "{e}"
    );
    assert!(e.contains("fix: write a size with binary units"), "{e}");
    let e = error("[[export]]\nname = \"a\"\nsize = 0\n");
    assert!(
        e.contains(":3:8: export[0].size: bad size \"0\": size must be greater than zero"),
        "{e}"
    );
    let e = error("[[export]]\nname = \"a\"\nsize = -5\n");
    assert!(e.contains("export[0].size: bad size -5: negative"), "{e}");
    let e = error("[memory]\nmax-memory = \"lots\"\n");
    assert!(
        e.contains(":2:14: memory.max-memory: bad size \"lots\""),
        "{e}"
    );
    let e = error(
        "[[export]]\nname = \"a\"\nsize = \"1G\"\n[[export]]\nname = \"b\"\nsize = \"1G\"\nmax-memory = \"1.5.5G\"\n",
    );
    assert!(e.contains(":7:14: export[1].max-memory: bad size"), "{e}");
}

#[test]
fn duplicate_exports() {
    let e = error(
        "[[export]]\nname = \"a\"\nsize = \"1G\"\n\n[[export]]\nname = \"a\"\nsize = \"2G\"\n",
    );
    assert!(e.starts_with("/etc/ramnbd/test.toml:6:8: export[1].name: export name \"a\" is used twice (first at line 2)"), "{e}");
    assert!(e.contains("fix: give every [[export]] its own name"), "{e}");
}

#[test]
fn colliding_listeners() {
    let e = error("[listen]\ntcp = [\"0.0.0.0:10809\", \"127.0.0.1:10809\"]\n");
    assert!(
        e.contains(
            ":2:25: listen.tcp[1]: \"127.0.0.1:10809\" collides with \"0.0.0.0:10809\" (line 2)"
        ),
        "{e}"
    );
    let e = error("[listen]\nunix = [\"/run/a.sock\",\n  \"/run/a.sock\"]\n");
    assert!(
        e.contains(":3:3: listen.unix[1]: socket /run/a.sock is listed twice (first at line 2)"),
        "{e}"
    );
    let e = error("[listen]\ntcp = [\"127.0.0.1\"]\n");
    assert!(
        e.contains("listen.tcp[0]: \"127.0.0.1\" has no port"),
        "{e}"
    );
    let e = error("[listen]\ntcp = []\n");
    assert!(
        e.contains(":1:1: listen: [listen] has no tcp or unix entries"),
        "{e}"
    );
    let e =
        error("[listen]\ntcp = [\"127.0.0.1:10809\"]\n[metrics]\nlisten = \"127.0.0.1:10809\"\n");
    assert!(
        e.contains(":4:10: metrics.listen: the metrics address"),
        "{e}"
    );
    // Port 0 never collides, and different addresses on one port are fine.
    parse_str("[listen]\ntcp = [\"127.0.0.1:0\", \"127.0.0.1:0\", \"127.0.0.2:10809\", \"127.0.0.1:10809\"]\n").unwrap();
}

#[test]
fn syntax_and_type_errors() {
    let e = error("[[export]]\nname = scratch\n");
    assert!(e.starts_with("/etc/ramnbd/test.toml:2:8: (syntax):"), "{e}");
    assert!(e.contains("fix: fix the TOML syntax"), "{e}");
    let e = error("[memory]\nmlock = \"yes\"\n");
    assert!(
        e.contains(":2:9: memory.mlock: invalid type: string \"yes\", expected a boolean"),
        "{e}"
    );
    let e = error("[[export]]\nname = \"a\"\nsize = 1\n\n[[export]]\nname = \"b\"\n");
    assert!(
        e.contains(":5:1: export[1].size: missing field `size`"),
        "{e}"
    );
    let e = error("[server]\nshutdown-grace = \"soon\"\n");
    assert!(
        e.contains(":2:18: server.shutdown-grace: bad duration \"soon\""),
        "{e}"
    );
    let e = error("[logging]\nlevel = \"loud=[\"\n");
    assert!(e.contains(":2:9: logging.level:"), "{e}");
    let e = error("[server]\nmax-connections = 0\n");
    assert!(
        e.contains("server.max-connections: must be at least 1"),
        "{e}"
    );
}

fn cli(args: &[&str]) -> crate::cli::Cli {
    use clap::Parser;
    let mut argv = vec!["ramnbd"];
    argv.extend_from_slice(args);
    crate::cli::Cli::try_parse_from(argv).unwrap()
}

const FILE: &str = r#"
[listen]
tcp = ["127.0.0.1:10809"]
unix = ["/run/ramnbd/ramnbd.sock"]
[[export]]
name = "a"
size = "1G"
[[export]]
name = "b"
size = "2G"
[memory]
max-memory = "2G"
[metrics]
listen = "127.0.0.1:9109"
[server]
shutdown-grace = "3s"
"#;

#[test]
fn flags_override_the_file() {
    let file = parse_str(FILE).unwrap();
    // No flags: the file as it is.
    let c = file.clone().apply_cli(cli(&[])).unwrap();
    assert_eq!(c.exports.len(), 2);
    assert_eq!(c.listen.len(), 2);
    assert_eq!(c.shutdown_grace, Duration::from_secs(3));

    let c = file
        .clone()
        .apply_cli(cli(&[
            "-e",
            "x=4G",
            "-l",
            "127.0.0.1:0",
            "--max-memory",
            "1G",
            "--mlock",
            "--read-only",
            "--metrics",
            "127.0.0.1:9200",
            "--shutdown-grace",
            "500ms",
            "--log-level",
            "warn",
        ]))
        .unwrap();
    assert_eq!(c.exports.len(), 1);
    assert_eq!(
        (c.exports[0].name.as_str(), c.exports[0].size),
        ("x", 4 << 30)
    );
    assert!(c.exports[0].read_only);
    assert_eq!(c.listen, vec![ListenAddr::Tcp("127.0.0.1:0".into())]);
    assert_eq!(c.memory.max_memory, Some(1 << 30));
    assert!(c.memory.mlock);
    assert_eq!(c.metrics.as_deref(), Some("127.0.0.1:9200"));
    assert_eq!(c.shutdown_grace, Duration::from_millis(500));
    assert_eq!(c.log_level.as_deref(), Some("warn"));

    // --size replaces the file's exports with one default export; -u alone replaces TCP too.
    let c = file
        .clone()
        .apply_cli(cli(&["-s", "8G", "-u", "/tmp/x.sock"]))
        .unwrap();
    assert_eq!(c.exports.len(), 1);
    assert_eq!(
        (c.exports[0].name.as_str(), c.exports[0].size),
        ("", 8 << 30)
    );
    assert_eq!(c.listen, vec![ListenAddr::Unix("/tmp/x.sock".into())]);

    // The file's metrics address may collide with a listener given on the command line.
    let err = file
        .apply_cli(cli(&["-l", "127.0.0.1:9109"]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--metrics \"127.0.0.1:9109\": collides with the NBD listener"),
        "{err}"
    );
}

#[test]
fn bad_flags() {
    let err = |args: &[&str]| {
        Config::builtin()
            .apply_cli(cli(args))
            .unwrap_err()
            .to_string()
    };
    assert!(err(&["--shutdown-grace", "soon"]).starts_with("--shutdown-grace \"soon\""));
    assert!(
        err(&["-l", "0.0.0.0:1", "-l", "127.0.0.1:1"])
            .contains("collides with --listen \"0.0.0.0:1\"")
    );
    assert!(err(&["--metrics", "9109"]).contains("has no port"));
    assert!(err(&["-u", "/a", "-u", "/a"]).contains("given twice"));
}

#[test]
fn durations() {
    assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
    assert!(parse_duration("").is_err());
    assert_eq!(parse_duration("3h"), Ok(Duration::from_secs(3 * 3600)));
    assert!(parse_duration("25h").is_err());
    assert!(parse_duration("100000m").is_err());
}

/// Key paths come from the walk over toml's spanned document, at any depth and however a
/// table is written (header, dotted key, inline table, array of tables).
#[test]
fn key_paths() {
    let key = |text: &str| match parse_str(text).unwrap_err() {
        ConfigError::File(err) => (err.key, err.line, err.column),
        other => panic!("not a file error: {other}"),
    };
    assert_eq!(key("a = 1\n"), ("a".into(), 1, 1));
    assert_eq!(
        key("[listen]\ntcp = [\"127.0.0.1:1\", 2]\n"),
        ("listen.tcp[1]".into(), 2, 23)
    );
    assert_eq!(
        key("memory = { mlock = 1 }\n"),
        ("memory.mlock".into(), 1, 20)
    );
    assert_eq!(
        key("server.shutdown-grace = \"x\"\n"),
        ("server.shutdown-grace".into(), 1, 25)
    );
    assert_eq!(key("export = [1]\n"), ("export[0]".into(), 1, 11));
    assert_eq!(
        key(
            "[[export]]\nname = \"a\"\nsize = 1\n[[export]]\nname = \"b\"\nsize = 1\ndescription = 5\n"
        ),
        ("export[1].description".into(), 7, 15)
    );
}

/// The file must be valid on its own, and so must the flags over it; a clash between the two
/// names the flag and, for the file's side, its line.
#[test]
fn file_and_flags_are_validated_alike() {
    let path = Path::new("/etc/ramnbd/test.toml");
    let with = |text: &str, args: &[&str]| parse(path, text).and_then(|c| c.apply_cli(cli(args)));

    // A file that is wrong on its own stays wrong when flags replace the part that is wrong:
    // the service may be started without those flags.
    let colliding = "[listen]\ntcp = [\"0.0.0.0:10809\", \"127.0.0.1:10809\"]\n";
    let e = with(colliding, &["-l", "127.0.0.1:0"])
        .unwrap_err()
        .to_string();
    assert!(e.contains(":2:25: listen.tcp[1]:"), "{e}");

    let listener = "\n[listen]\ntcp = [\"127.0.0.1:10809\"]\n";
    let e = with(listener, &["--metrics", "127.0.0.1:10809"])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(
            "--metrics \"127.0.0.1:10809\": collides with the NBD listener \"127.0.0.1:10809\" \
             (line 3); give metrics a port of its own"
        ),
        "{e}"
    );
    let e = with(
        "[metrics]\nlisten = \"127.0.0.1:9\"\n",
        &["-l", "127.0.0.1:9"],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("listener --listen \"127.0.0.1:9\"; give metrics a port of its own with --metrics, which overrides metrics.listen at /etc/ramnbd/test.toml:2"),
        "{e}"
    );

    let long = "x".repeat(4097);
    let e = error(&format!("[[export]]\nname = \"{long}\"\nsize = 1\n"));
    assert!(
        e.contains(":2:8: export[0].name: the export name is longer than the 4096 bytes"),
        "{e}"
    );
    let e = with("", &["-e", &format!("{long}=1M")])
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("--export \"xxx") && e.contains("is longer than the 4096 bytes"));

    // clap itself refuses an empty --unix.
    let e = error("[listen]\nunix = [\"\"]\n");
    assert!(
        e.contains(":2:9: listen.unix[0]: the socket path is empty"),
        "{e}"
    );
}

#[test]
fn more_file_errors() {
    let e = error("[export]\nname = \"a\"\nsize = \"1G\"\n");
    assert!(e.contains(":1:1: export: a single [export] table"), "{e}");
    assert!(
        e.contains("fix: write [[export]], in double brackets"),
        "{e}"
    );
    let e = error("[metrics]\nlisten = \"127.0.0.1:9109\"\nport = 1\n");
    assert!(
        e.contains(":3:1: metrics.port: unknown field `port`, expected `listen`\n"),
        "{e}"
    );
    let e = error("[server]\nmax-connections = -3\n");
    assert!(
        e.contains(":2:19: server.max-connections: must be at least 1"),
        "{e}"
    );
    let e = error("[server]\nmax-connections = \"many\"\n");
    assert!(
        e.contains("invalid type: string \"many\", expected a whole number"),
        "{e}"
    );
    let e = error("[[export]]\nname = \"a\"\nsize = 1.5\n");
    assert!(
        e.contains(":3:8: export[0].size: bad size 1.5: not a whole number"),
        "{e}"
    );
    let e = error("[[export]]\nname = \"a\"\nsize = 99999999999999999999\n");
    assert!(
        e.contains("export[0].size: 99999999999999999999 is out of range"),
        "{e}"
    );
    let e = error("[[export]]\nname = 7\nsize = 1\n");
    assert!(
        e.contains(":2:8: export[0].name: invalid type: integer `7`, expected a string"),
        "{e}"
    );
    let e = error("listen = [\"127.0.0.1:1\"]\n");
    assert!(
        e.contains(":1:10: listen: invalid type: array, expected a table"),
        "{e}"
    );
    let e = error("a = 1\na = 2\n");
    assert!(
        e.starts_with("/etc/ramnbd/test.toml:2:1: (syntax): duplicate key"),
        "{e}"
    );
    // Durations: humantime's forms, and plain numbers of seconds.
    let grace = |value: &str| {
        parse_str(&format!("[server]\nshutdown-grace = {value}\n"))
            .unwrap()
            .shutdown_grace
    };
    assert_eq!(grace("\"1m30s\""), Duration::from_secs(90));
    assert_eq!(grace("90"), Duration::from_secs(90));
    assert_eq!(grace("1.5"), Duration::from_millis(1500));
    assert_eq!(grace("\"0.5m\""), Duration::from_secs(30));
    // An empty export list keeps the default export, as leaving it out does.
    assert_eq!(
        parse_str("export = []\n").unwrap().exports,
        Config::builtin().exports
    );
}

#[test]
fn humantime_durations() {
    assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    assert_eq!(parse_duration("2min"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("10 s"), Ok(Duration::from_secs(10)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    assert_eq!(
        parse_duration("1441m"),
        Err("out of range (at most a day)".into())
    );
    assert_eq!(
        parse_duration("5 fortnights"),
        Err("unknown unit \"fortnights\"; use ms, s, m or h".into())
    );
    assert_eq!(
        parse_duration("soon"),
        Err("expected a number with a unit, such as 10s, 500ms or 1m30s".into())
    );
    assert!(parse_duration("-1").is_err());
    assert!(parse_duration("nan").is_err());
}

#[test]
fn the_backing_setting() {
    assert_eq!(
        parse_str("").unwrap().memory.backing,
        BackingChoice::Auto,
        "the default"
    );
    let c = parse_str("[memory]\nbacking = \"anonymous\"\n").unwrap();
    assert_eq!(c.memory.backing, BackingChoice::Anonymous);
    let e = error("[memory]\nbacking = \"shm\"\n");
    assert!(
        e.starts_with("/etc/ramnbd/test.toml:2:11: memory.backing: unknown backing \"shm\""),
        "{e}"
    );
    assert!(e.contains("fix: use \"anonymous\""), "{e}");
    let e = error("[memory]\nbacking = true\n");
    assert!(e.contains("memory.backing: invalid type"), "{e}");
    // The flag replaces the file's value, and is checked the same way.
    let c = c.apply_cli(cli(&["--backing", "memfd"])).unwrap();
    assert_eq!(c.memory.backing, BackingChoice::Memfd);
    let e = Config::builtin()
        .apply_cli(cli(&["--backing", "ram"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--backing") && e.contains("\"ram\""), "{e}");
}

#[test]
fn auto_backing_is_a_memfd_only_under_a_service_manager() {
    let env = |set: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            set.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.into())
        }
    };
    let auto = BackingChoice::Auto;
    assert_eq!(auto.resolve(env(&[])), BackingKind::Anonymous);
    assert_eq!(
        auto.resolve(env(&[("NOTIFY_SOCKET", "")])),
        BackingKind::Anonymous
    );
    let systemd = env(&[("NOTIFY_SOCKET", "/run/systemd/notify"), ("FDSTORE", "8")]);
    assert_eq!(auto.resolve(systemd), BackingKind::Memfd);
    assert_eq!(
        BackingChoice::Anonymous.resolve(systemd),
        BackingKind::Anonymous
    );
    assert_eq!(BackingChoice::Memfd.resolve(env(&[])), BackingKind::Memfd);
}

#[test]
fn images_and_save_intervals() {
    let c = parse_str(
        r#"
[[export]]
name = "a"
size = "1G"
image = "/var/lib/ramnbd/a.img"
save-interval = "15m"
[[export]]
name = "b"
size = "1G"
image = "b.img"
[server]
save-interval = "1h"
"#,
    )
    .unwrap();
    assert_eq!(c.exports[0].image, Some("/var/lib/ramnbd/a.img".into()));
    assert_eq!(c.exports[0].save_interval, Some(Duration::from_secs(900)));
    assert_eq!(c.exports[1].image, Some("b.img".into()));
    assert_eq!(c.exports[1].save_interval, None);
    assert_eq!(c.save_interval, Some(Duration::from_secs(3600)));

    let e = error("[[export]]\nname = \"a\"\nsize = \"1G\"\nimage = \"\"\n");
    assert!(e.contains(":4:9: export[0].image: is empty"), "{e}");
    let e = error(
        "[[export]]\nname = \"a\"\nsize = \"1G\"\nimage = \"x.img\"\n\
         [[export]]\nname = \"b\"\nsize = \"1G\"\nimage = \"x.img\"\n",
    );
    assert!(e.contains("two exports cannot share one file"), "{e}");

    // Flags: --image is the default export's, --save-interval the global interval.
    let c = Config::try_from(cli(&[
        "-s",
        "1G",
        "--image",
        "/d.img",
        "--save-interval",
        "10m",
    ]))
    .unwrap();
    assert_eq!(c.exports[0].image, Some("/d.img".into()));
    assert_eq!(c.save_interval, Some(Duration::from_secs(600)));
    let e = Config::try_from(cli(&["-e", "a=1G", "--image", "/d.img"]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--image") && e.contains("no default export"),
        "{e}"
    );
    let c = Config::try_from(cli(&["-e", "a=1G,image=/a.img,save-interval=30s,ro"])).unwrap();
    assert_eq!(c.exports[0].image, Some("/a.img".into()));
    assert_eq!(c.exports[0].save_interval, Some(Duration::from_secs(30)));
    assert!(c.exports[0].read_only);
    let e = Config::try_from(cli(&["-e", "a=1G,image=/x", "-e", "b=1G,image=/x"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("two exports cannot share one file"), "{e}");
    for bad in ["a=1G,image=", "a=1G,save-interval=soon"] {
        let e = Config::try_from(cli(&["-e", bad])).unwrap_err().to_string();
        assert!(e.contains("image") || e.contains("save-interval"), "{e}");
    }
}

#[test]
fn the_limits_keys_and_flags() {
    // The defaults.
    let c = parse_str("").unwrap();
    assert_eq!(c.handshake_timeout, Duration::from_secs(10));
    assert_eq!(c.max_connections_per_client, 0);
    assert_eq!(c.tcp_keepalive, Duration::from_secs(60));

    let file = "[server]\nhandshake-timeout = \"2s\"\nmax-connections-per-client = 8\n\
                tcp-keepalive = \"30s\"\n";
    let c = parse_str(file).unwrap();
    assert_eq!(c.handshake_timeout, Duration::from_secs(2));
    assert_eq!(c.max_connections_per_client, 8);
    assert_eq!(c.tcp_keepalive, Duration::from_secs(30));
    // Zero is allowed: no deadline, no cap, no keepalive.
    let c = parse_str("[server]\nhandshake-timeout = 0\ntcp-keepalive = 0\n").unwrap();
    assert!(c.handshake_timeout.is_zero() && c.tcp_keepalive.is_zero());

    // Flags win over the file.
    let c = parse_str(file)
        .unwrap()
        .apply_cli(cli(&[
            "--handshake-timeout",
            "500ms",
            "--max-connections",
            "3000",
            "--max-connections-per-client",
            "0",
            "--tcp-keepalive",
            "0",
        ]))
        .unwrap();
    assert_eq!(c.handshake_timeout, Duration::from_millis(500));
    assert_eq!(c.max_connections, 3000);
    assert_eq!(c.max_connections_per_client, 0);
    assert!(c.tcp_keepalive.is_zero());

    // Bad values name the file, line, key and fix.
    let e = error("[server]\nhandshake-timeout = \"soon\"\n");
    assert!(
        e.contains("test.toml:2:21: server.handshake-timeout: bad duration \"soon\""),
        "{e}"
    );
    let e = error("[server]\nmax-connections-per-client = -1\n");
    assert!(
        e.contains(":2:30: server.max-connections-per-client: must not be negative")
            && e.contains("or 0 for no limit"),
        "{e}"
    );
    let e = error("[server]\ntcp-keepalive = \"1 fortnight\"\n");
    assert!(
        e.contains(":2:17: server.tcp-keepalive: bad duration"),
        "{e}"
    );

    // Bad flags name the flag, the value and what is expected.
    let flag_error = |args: &[&str]| Config::builtin().apply_cli(cli(args)).unwrap_err();
    let e = flag_error(&["--max-connections", "0"]).to_string();
    assert!(
        e.contains("--max-connections") && e.contains("at least 1"),
        "{e}"
    );
    let e = flag_error(&["--max-connections-per-client", "many"]).to_string();
    assert!(
        e.contains("--max-connections-per-client") && e.contains("\"many\""),
        "{e}"
    );
    let e = flag_error(&["--handshake-timeout", "10 parsecs"]).to_string();
    assert!(
        e.contains("--handshake-timeout") && e.contains("unknown unit"),
        "{e}"
    );
}

#[test]
fn access_rules_take_one_value_or_lists() {
    let c = parse_str(
        r#"
[access]
allow = ["10.0.0.0/8", "fd00::/8"]

[[export]]
name = "a"
size = "1M"
allow = "10.1.0.0/16"
allow-uid = [0, 1000]
allow-gid = 6
allow-identity = ["client-a", "client-b"]

[[export]]
name = "b"
size = "1M"
"#,
    )
    .unwrap();
    let shown: Vec<String> = c.allow.iter().map(ToString::to_string).collect();
    assert_eq!(shown, ["10.0.0.0/8", "fd00::/8"]);
    let a = &c.exports[0].access;
    assert_eq!(a.networks.len(), 1);
    assert_eq!(a.uids, [0, 1000]);
    assert_eq!(a.gids, [6]);
    assert_eq!(a.identities, ["client-a", "client-b"]);
    assert!(c.exports[1].access.is_open());
}

#[test]
fn bad_access_rules_name_the_file_key_and_fix() {
    let err = error("[access]\nallow = [\"10.0.0.0/8\", \"10.0.0.1/8\"]\n");
    assert!(
        err.starts_with("/etc/ramnbd/test.toml:2:24: access.allow[1]: bad network"),
        "{err}"
    );
    assert!(
        err.contains("host bits") && err.contains("fix: write a network"),
        "{err}"
    );
    let err = error("[[export]]\nname = \"a\"\nsize = \"1M\"\nallow-uid = \"root\"\n");
    assert!(
        err.contains("export[0].allow-uid: \"root\" is not a numeric uid"),
        "{err}"
    );
    assert!(err.contains("id -u NAME"), "{err}");
    let err = error("[[export]]\nname = \"a\"\nsize = \"1M\"\nallow-gid = [4294967296]\n");
    assert!(
        err.contains("export[0].allow-gid[0]: 4294967296 is not a uid or gid"),
        "{err}"
    );
    let err = error("[[export]]\nname = \"a\"\nsize = \"1M\"\nallow-identity = \"\"\n");
    assert!(err.contains("export[0].allow-identity: is empty"), "{err}");
    let err = error("[access]\ndeny = []\n");
    assert!(
        err.contains("unknown field `deny`, expected `allow`"),
        "{err}"
    );
}

/// ramnbd.toml(5) documents every section and key the parser accepts, each under its
/// section's heading (a key that is new here and missing there fails this).
#[test]
fn the_man_page_documents_every_key() {
    let man = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/man/ramnbd.toml.5"
    ));
    let tables: [(&str, &[&str]); 8] = [
        ("[listen]", LISTEN_KEYS),
        ("[[export]]", EXPORT_KEYS),
        ("[memory]", MEMORY_KEYS),
        ("[logging]", LOGGING_KEYS),
        ("[metrics]", METRICS_KEYS),
        ("[server]", SERVER_KEYS),
        ("[access]", ACCESS_KEYS),
        ("[tls]", TLS_KEYS),
    ];
    assert_eq!(tables.len(), SECTIONS.len());
    for (heading, keys) in tables {
        let start = man
            .find(&format!(".SH \"{heading}\"\n"))
            .unwrap_or_else(|| panic!("ramnbd.toml.5 has no section {heading}"));
        let rest = &man[start + 1..];
        let section = &rest[..rest.find("\n.SH ").unwrap_or(rest.len())];
        for key in keys {
            let entry = format!("\n.TP\n.B {}\n", key.replace('-', "\\-"));
            assert!(
                section.contains(&entry),
                "ramnbd.toml.5 lacks {heading} {key}"
            );
        }
    }
}
