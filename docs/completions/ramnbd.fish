complete -c ramnbd -s c -l config -d 'Read settings from this TOML file. Without it, /etc/ramnbd/ramnbd.toml is read if it exists. Flags given here override the file' -r -F
complete -c ramnbd -s t -l check-config -d 'Validate the configuration and exit: 0 if it is valid, 1 if not. Checks FILE, else --config, else the default file, with any other flags applied on top' -r -F
complete -c ramnbd -l metrics -d 'Serve Prometheus metrics over HTTP at http://HOST:PORT/metrics (off by default)' -r
complete -c ramnbd -l shutdown-grace -d 'How long a stopping server (SIGTERM, SIGINT) lets connections finish requests already sent before it closes them (e.g. 10s, 500ms, 1m30s; at most 1h; default 10s)' -r
complete -c ramnbd -l max-connections -d 'Connections served at once; further clients wait until one leaves (default 1024). The soft open-files limit is raised at start to what this needs' -r
complete -c ramnbd -l max-connections-per-client -d 'Connections one client may hold at once, counted by IP address for TCP (0: no limit, the default). A connection over it is closed before the greeting' -r
complete -c ramnbd -l handshake-timeout -d 'Close a connection that has not finished its handshake within this time (default 10s; 0: no deadline, which lets silent connections hold their slot for ever)' -r
complete -c ramnbd -l tcp-keepalive -d 'Idle time before TCP keepalive probes find a vanished client (default 60s; 0: off)' -r
complete -c ramnbd -l allow -d 'Accept TCP clients only from this network (CIDR such as 10.0.0.0/8 or fd00::/8, or one address). Repeatable; replaces the config file\'s list. Without it, any address may connect. Others are closed before the greeting. Unix-socket clients are not affected' -r
complete -c ramnbd -s s -l size -d 'Size of the default export (binary units: 4G = 4 GiB)' -r
complete -c ramnbd -s e -l export -d 'Add an export: NAME=SIZE[,OPTION]..., where each OPTION is one of ro, max-memory=SIZE, image=PATH, save-interval=DURATION, tls=require, allow=CIDR, allow-uid=UID, allow-gid=GID, allow-identity=NAME, description=TEXT. Repeatable; when given, there is no default export. An empty NAME (`=1G`) is the default export. The description runs to the end of the argument, commas included. The allow options repeat and restrict who may see and use the export: allow= TCP networks, allow-uid=/allow-gid= Unix-socket peers, allow-identity= verified TLS certificate identities; an export with rules for only TCP or only Unix peers refuses the other kind' -r
complete -c ramnbd -s l -l listen -d 'Listen on a TCP address (HOST:PORT; port 0 picks a free one). Repeatable. Without --listen or --unix: 127.0.0.1:10809' -r
complete -c ramnbd -s u -l unix -d 'Listen on a Unix socket. Repeatable' -r -F
complete -c ramnbd -l max-memory -d 'Cap on the RAM all exports together may hold (binary units). A write that would go over it fails with ENOSPC; TRIM and zero writes make room again' -r
complete -c ramnbd -l backing -d 'Where export bytes live: anonymous (memory that dies with the process), memfd (a file in RAM that a service manager\'s file-descriptor store can keep across restarts), or auto: memfd when NOTIFY_SOCKET is set (under systemd), anonymous otherwise. Default: auto' -r
complete -c ramnbd -l image -d 'Load the default export from this image file at start (if it exists) and save it there on stop, on SIGHUP (systemctl reload) and every --save-interval. A raw, sparse image of the export\'s size; other exports take image=PATH in --export or the config file' -r -F
complete -c ramnbd -l save-interval -d 'Also save images this often (e.g. 10m, 1h; 0: only on stop and SIGHUP, the default). An export\'s own save-interval wins. A periodic save is skipped if nothing changed' -r
complete -c ramnbd -l tls -d 'TLS (STARTTLS): off (the default), on (offered; exports with tls=require need it) or require (every client must start TLS before any option but ABORT). On and require need --tls-certificates' -r
complete -c ramnbd -l tls-certificates -d 'The TLS credentials directory, in the layout of nbdkit and qemu: server-cert.pem, server-key.pem and (for --tls-verify-peer) ca-cert.pem. Read again on SIGHUP' -r -F
complete -c ramnbd -l tls-psk -d 'TLS with pre-shared keys (identity:hexkey file): not supported by ramnbd\'s TLS stack; refused at start with an explanation' -r -F
complete -c ramnbd -l log-level -d 'Log level or filter (error, warn, info, debug, trace, or a RUST_LOG-style directive)' -r
complete -c ramnbd -l no-config -d 'Do not read /etc/ramnbd/ramnbd.toml'
complete -c ramnbd -l read-only -d 'Make every export read-only'
complete -c ramnbd -l mlock -d 'Lock export pages in RAM as they are written (never swapped). Needs RLIMIT_MEMLOCK (systemd: LimitMEMLOCK=) at least as large as the memory the exports will hold'
complete -c ramnbd -l hugepages -d 'Back exports with transparent huge pages (MADV_HUGEPAGE): fewer TLB misses, but RAM is then taken and returned in 2 MiB units, so TRIMs smaller than 2 MiB free less'
complete -c ramnbd -l tls-verify-peer -d 'Require a client certificate signed by a CA in ca-cert.pem; its subject CN is the client\'s identity'
complete -c ramnbd -s h -l help -d 'Print help (see more with \'--help\')'
complete -c ramnbd -s V -l version -d 'Print version'
