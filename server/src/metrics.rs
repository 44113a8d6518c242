//! Live metrics in the Prometheus text format, served over HTTP at `/metrics` when enabled.
//!
//! Counting is done with relaxed atomics in structures created once at startup: one
//! [`ExportMetrics`] per export, with a fixed slot per NBD command. A connection looks up its
//! export's handle once, after the handshake, and the transmission phase counts each request at
//! its single completion point ([`ExportMetrics::record`]): no lock, no allocation, no map lookup
//! per request. With metrics off there is no handle, no clock read, and one branch per request.
//!
//! [`prometheus_client`] does the text encoding at scrape time, through a [`Collector`] that
//! reads the atomics (its own `Histogram` takes a mutex per observation, so it is not used).

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::export::Exports;

/// The name of an NBD command, as metrics label it and logs name it ("other" for commands
/// this server does not know).
pub fn command_name(command: u16) -> &'static str {
    COMMANDS[usize::from(command).min(COMMANDS.len() - 1)]
}

/// Label values for the command slots: index = command number, the last slot is "other".
const COMMANDS: [&str; 9] = [
    "read",
    "write",
    "disc",
    "flush",
    "trim",
    "cache",
    "write_zeroes",
    "block_status",
    "other",
];

/// Upper bounds of the latency buckets, in microseconds (10 µs to 10 s). A RAM disk answers
/// most requests in microseconds; the top buckets catch stalls on the network or a full queue.
const BUCKETS_US: [u64; 19] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Counters for one command on one export.
#[derive(Debug, Default)]
struct CommandMetrics {
    requests: AtomicU64,
    errors: AtomicU64,
    /// Bytes of successful requests: the length of the range read, written, trimmed, ...
    bytes: AtomicU64,
    /// Per-bucket (not cumulative) counts; the last slot is +Inf.
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    latency_sum_ns: AtomicU64,
}

/// The counters of one export; shared by every connection to it.
#[derive(Debug, Default)]
pub struct ExportMetrics {
    commands: [CommandMetrics; COMMANDS.len()],
}

impl ExportMetrics {
    /// Counts one finished request: `command` is the wire command number, `bytes` the length
    /// of its range, `failed` whether the reply is an error, `latency` from its arrival to its
    /// reply being completely written.
    #[inline]
    pub fn record(&self, command: u16, bytes: u64, failed: bool, latency: Duration) {
        let slot = &self.commands[usize::from(command).min(COMMANDS.len() - 1)];
        slot.requests.fetch_add(1, Relaxed);
        if failed {
            slot.errors.fetch_add(1, Relaxed);
        } else {
            slot.bytes.fetch_add(bytes, Relaxed);
        }
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        // Compared in nanoseconds: a bucket holds what is at most its bound (10.9 µs is not
        // in the 10 µs bucket).
        let bucket = BUCKETS_US.partition_point(|&bound| bound * 1000 < ns);
        slot.buckets[bucket].fetch_add(1, Relaxed);
        slot.latency_sum_ns.fetch_add(ns, Relaxed);
    }
}

/// Server-wide metrics: per-export counters and connection counts.
#[derive(Debug)]
pub struct Metrics {
    exports: Arc<Exports>,
    /// Same order as `exports`.
    per_export: Vec<Arc<ExportMetrics>>,
    by_name: HashMap<String, usize>,
    connections_open: AtomicU64,
    connections_total: AtomicU64,
    /// The connection cap (`max-connections` as in force), 0 until set.
    connections_max: AtomicU64,
    resident: ResidentSamples,
}

/// How old a sample of the exports' resident bytes may be before a scrape starts a new one.
const RESIDENT_MAX_AGE: Duration = Duration::from_secs(10);

/// Resident bytes per export, sampled off the scrape path: asking the kernel (`mincore`) costs
/// in proportion to the data an export holds, so a scrape only reads the last sample and, if
/// it is old, starts a new one on the blocking pool. A value is at most one scrape interval
/// plus [`RESIDENT_MAX_AGE`] old; before the first sample it is 0.
#[derive(Debug, Default)]
struct ResidentSamples {
    /// Same order as the exports.
    bytes: Vec<AtomicU64>,
    taken_at: std::sync::Mutex<Option<std::time::Instant>>,
    sampling: std::sync::atomic::AtomicBool,
    /// Samples taken, for tests.
    count: AtomicU64,
}

impl Metrics {
    pub fn new(exports: Arc<Exports>) -> Arc<Metrics> {
        let mut per_export = Vec::new();
        let mut by_name = HashMap::new();
        for (i, export) in exports.iter().enumerate() {
            per_export.push(Arc::default());
            by_name.insert(export.name.clone(), i);
        }
        let resident = ResidentSamples {
            bytes: exports.iter().map(|_| AtomicU64::new(0)).collect(),
            ..ResidentSamples::default()
        };
        Arc::new(Metrics {
            exports,
            per_export,
            by_name,
            connections_open: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            connections_max: AtomicU64::new(0),
            resident,
        })
    }

    /// The connection cap in force, shown as `ramnbd_connections_max`.
    pub fn set_max_connections(&self, max: usize) {
        self.connections_max
            .store(u64::try_from(max).unwrap_or(u64::MAX), Relaxed);
    }

    /// Starts sampling resident bytes on the blocking pool if the last sample is older than
    /// [`RESIDENT_MAX_AGE`] and no sampling runs. Call from within the runtime.
    pub fn refresh_resident(self: &Arc<Self>) {
        let stale = self
            .resident
            .taken_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none_or(|at| at.elapsed() >= RESIDENT_MAX_AGE);
        if !stale || self.resident.sampling.swap(true, Relaxed) {
            return;
        }
        let metrics = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let resident = &metrics.resident;
            for (export, bytes) in metrics.exports.iter().zip(&resident.bytes) {
                bytes.store(export.disk.resident_bytes(), Relaxed);
            }
            *resident.taken_at.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(std::time::Instant::now());
            resident.count.fetch_add(1, Relaxed);
            resident.sampling.store(false, Relaxed);
        });
    }

    /// The handle a connection to `export` counts its requests with.
    pub fn export(&self, export: &str) -> Option<Arc<ExportMetrics>> {
        self.by_name
            .get(export)
            .map(|&i| Arc::clone(&self.per_export[i]))
    }

    /// Counts a connection as open until the returned guard is dropped.
    pub fn connection(self: &Arc<Self>) -> ConnectionGuard {
        self.connections_open.fetch_add(1, Relaxed);
        self.connections_total.fetch_add(1, Relaxed);
        ConnectionGuard(Arc::clone(self))
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(self: &Arc<Self>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Arc::clone(self)));
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }
}

/// Keeps a connection counted as open.
#[derive(Debug)]
pub struct ConnectionGuard(Arc<Metrics>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Relaxed);
    }
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut m = encoder.encode_descriptor(
            "ramnbd_connections_open",
            "Client connections open now",
            None,
            MetricType::Gauge,
        )?;
        m.encode_gauge(&self.connections_open.load(Relaxed))?;
        let mut m = encoder.encode_descriptor(
            "ramnbd_connections",
            "Client connections accepted",
            None,
            MetricType::Counter,
        )?;
        m.encode_counter::<NoLabelSet, _, u64>(&self.connections_total.load(Relaxed), None)?;
        let mut m = encoder.encode_descriptor(
            "ramnbd_connections_max",
            "Connections served at once at most (max-connections); further clients wait",
            None,
            MetricType::Gauge,
        )?;
        m.encode_gauge(&self.connections_max.load(Relaxed))?;
        let (held, cap) = self.exports.memory_usage();
        let mut m = encoder.encode_descriptor(
            "ramnbd_memory_held_bytes",
            "RAM all exports together hold (written and not trimmed)",
            None,
            MetricType::Gauge,
        )?;
        m.encode_gauge(&held)?;
        if let Some(cap) = cap {
            let mut m = encoder.encode_descriptor(
                "ramnbd_memory_max_bytes",
                "The cap on RAM for all exports together ([memory] max-memory; absent: none)",
                None,
                MetricType::Gauge,
            )?;
            m.encode_gauge(&cap)?;
        }

        type Gauge = fn(&Metrics, usize, &crate::export::Export) -> u64;
        let gauges: [(&str, &str, Gauge); 4] = [
            (
                "ramnbd_export_size_bytes",
                "Size of the export as clients see it",
                |_, _, e| e.size(),
            ),
            (
                "ramnbd_export_allocated_bytes",
                "Bytes of the export backed by memory (written and not trimmed)",
                |_, _, e| e.disk.allocated_bytes(),
            ),
            (
                "ramnbd_export_resident_bytes",
                "Bytes of the export resident in RAM (not swapped out), sampled at most 10 s ago",
                |m, i, _| m.resident.bytes[i].load(Relaxed),
            ),
            (
                "ramnbd_export_save_pause_longest_microseconds",
                "Longest time a save of the export's image held client writes back (0: none yet)",
                |_, _, e| {
                    let pause = e.disk.longest_snapshot_pause().as_micros();
                    u64::try_from(pause).unwrap_or(u64::MAX)
                },
            ),
        ];
        for (name, help, value) in gauges {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (i, export) in self.exports.iter().enumerate() {
                let labels = [("export", export.name.as_str())];
                m.encode_family(&labels)?
                    .encode_gauge(&value(self, i, export))?;
            }
        }

        type Field = fn(&CommandMetrics) -> &AtomicU64;
        let counters: [(&str, &str, Field); 3] = [
            (
                "ramnbd_requests",
                "Requests answered, by export and command",
                |c| &c.requests,
            ),
            (
                "ramnbd_request_errors",
                "Requests answered with an error, by export and command",
                |c| &c.errors,
            ),
            (
                "ramnbd_request_bytes",
                "Bytes covered by successful requests (read, written, trimmed, zeroed, ...)",
                |c| &c.bytes,
            ),
        ];
        for (name, help, field) in counters {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (export, command, slot) in self.used_slots() {
                let labels = [("export", export), ("command", command)];
                m.encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&field(slot).load(Relaxed), None)?;
            }
        }

        let mut m = encoder.encode_descriptor(
            "ramnbd_request_duration_seconds",
            "Time from a request's arrival to its reply being completely written",
            None,
            MetricType::Histogram,
        )?;
        for (export, command, slot) in self.used_slots() {
            let counts: Vec<u64> = slot.buckets.iter().map(|b| b.load(Relaxed)).collect();
            let buckets: Vec<(f64, u64)> = BUCKETS_US
                .iter()
                .zip(&counts)
                .map(|(&bound, &count)| (bound as f64 / 1e6, count))
                .collect();
            let count = counts.iter().sum();
            let sum = slot.latency_sum_ns.load(Relaxed) as f64 / 1e9;
            let labels = [("export", export), ("command", command)];
            m.encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// (export, command, counters) for every command an export has seen.
    fn used_slots(&self) -> impl Iterator<Item = (&str, &str, &CommandMetrics)> {
        self.exports
            .iter()
            .zip(&self.per_export)
            .flat_map(|(export, metrics)| {
                metrics
                    .commands
                    .iter()
                    .zip(COMMANDS)
                    .filter(|(slot, _)| slot.requests.load(Relaxed) > 0)
                    .map(move |(slot, command)| (export.name.as_str(), command, slot))
            })
    }
}

/// Scrapes served at once; more wait for a slot.
const MAX_SCRAPES: usize = 8;
/// A scraper must send its request within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the metrics listener (before readiness is announced, so a bad address fails startup).
pub async fn bind(addr: &str) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|err| io::Error::new(err.kind(), format!("metrics: listen on {addr}: {err}")))
}

/// Serves `GET /metrics` until `shutdown` is cancelled. A deliberately tiny HTTP/1.x server:
/// one request per connection, answered and closed.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            if let Err(err) = answer(stream, &metrics).await {
                tracing::debug!(cause = %err, "metrics request failed");
            }
            drop(slot);
        });
    }
}

async fn answer(mut stream: TcpStream, metrics: &Arc<Metrics>) -> io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
            if head.len() > 8192 || stream.read_buf(&mut head).await? == 0 {
                break;
            }
        }
        Ok::<_, io::Error>(())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read_head)
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            metrics.refresh_resident();
            (
                "200 OK",
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                metrics.render(),
            )
        }
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "ramnbd serves metrics at /metrics\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET\n".to_owned(),
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        response.push_str(&body);
    }
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ExportConfig;
    use crate::proto::consts::*;

    fn exports() -> Arc<Exports> {
        let config = |name: &str| ExportConfig {
            name: name.to_owned(),
            size: 1 << 20,
            read_only: false,
            description: String::new(),
            max_memory: None,
            ..Default::default()
        };
        Arc::new(Exports::new(&[config(""), config("b")]).unwrap())
    }

    #[test]
    fn memory_held_and_its_cap() {
        let config = ExportConfig {
            name: "a".to_owned(),
            size: 1 << 20,
            ..Default::default()
        };
        let memory = crate::config::MemoryConfig {
            max_memory: Some(1 << 19),
            ..Default::default()
        };
        let exports = Arc::new(Exports::with_memory(&[config], &memory).unwrap());
        exports.get("a").unwrap().disk.write(0, &[1; 8192]).unwrap();
        let text = Metrics::new(exports).render();
        for line in [
            "ramnbd_memory_held_bytes 8192",
            "ramnbd_memory_max_bytes 524288",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn records_and_renders() {
        let metrics = Metrics::new(exports());
        let b = metrics.export("b").unwrap();
        b.record(CMD_WRITE, 4096, false, Duration::from_micros(30));
        b.record(CMD_WRITE, 4096, false, Duration::from_micros(3));
        b.record(CMD_READ, 512, true, Duration::from_secs(20));
        b.record(0x77, 0, true, Duration::ZERO);
        let guard = metrics.connection();
        metrics.set_max_connections(7);
        let text = metrics.render();
        // No memory cap: no ramnbd_memory_max_bytes (an alert on it must not fire).
        assert!(!text.contains("ramnbd_memory_max_bytes"), "{text}");
        for line in [
            "ramnbd_connections_open 1",
            "ramnbd_connections_max 7",
            "ramnbd_memory_held_bytes 0",
            "ramnbd_connections_total 1",
            "ramnbd_export_size_bytes{export=\"b\"} 1048576",
            "ramnbd_export_size_bytes{export=\"\"} 1048576",
            "ramnbd_requests_total{export=\"b\",command=\"write\"} 2",
            "ramnbd_request_bytes_total{export=\"b\",command=\"write\"} 8192",
            "ramnbd_request_errors_total{export=\"b\",command=\"read\"} 1",
            "ramnbd_request_bytes_total{export=\"b\",command=\"read\"} 0",
            "ramnbd_requests_total{export=\"b\",command=\"other\"} 1",
            "ramnbd_request_duration_seconds_bucket{export=\"b\",command=\"write\",le=\"1e-05\"} 1",
            "ramnbd_request_duration_seconds_bucket{export=\"b\",command=\"write\",le=\"2.5e-05\"} 1",
            "ramnbd_request_duration_seconds_bucket{export=\"b\",command=\"write\",le=\"5e-05\"} 2",
            "ramnbd_request_duration_seconds_bucket{export=\"b\",command=\"read\",le=\"10\"} 0",
            "ramnbd_request_duration_seconds_bucket{export=\"b\",command=\"read\",le=\"+Inf\"} 1",
            "ramnbd_request_duration_seconds_sum{export=\"b\",command=\"read\"} 20.0",
            "ramnbd_request_duration_seconds_count{export=\"b\",command=\"write\"} 2",
            "ramnbd_export_resident_bytes{export=\"b\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
        // A latency just over a bucket's bound is counted in the next bucket, not that one.
        b.record(CMD_FLUSH, 0, false, Duration::from_nanos(10_900));
        let text = metrics.render();
        for line in [
            "ramnbd_request_duration_seconds_bucket{export=\"b\",command=\"flush\",le=\"1e-05\"} 0",
            "ramnbd_request_duration_seconds_bucket{export=\"b\",command=\"flush\",le=\"2.5e-05\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
        // Commands never used on an export have no series.
        assert!(!text.contains("export=\"\",command="), "{text}");
        drop(guard);
        assert!(metrics.render().contains("ramnbd_connections_open 0\n"));
    }
}

#[cfg(test)]
mod resident_tests {
    use super::*;
    use crate::config::ExportConfig;

    #[tokio::test]
    async fn scrapes_read_a_sample_taken_off_the_scrape_path() {
        let config = ExportConfig {
            name: "a".to_owned(),
            size: 64 << 20,
            read_only: false,
            description: String::new(),
            max_memory: None,
            ..Default::default()
        };
        let exports = Arc::new(Exports::new(&[config]).unwrap());
        exports
            .get("a")
            .unwrap()
            .disk
            .write(0, &[7; 3 * 4096])
            .unwrap();
        let metrics = Metrics::new(exports);
        // Rendering alone never samples: its cost does not grow with the data held.
        for _ in 0..3 {
            assert!(
                metrics
                    .render()
                    .contains("ramnbd_export_resident_bytes{export=\"a\"} 0\n")
            );
        }
        assert_eq!(metrics.resident.count.load(Relaxed), 0);
        // A scrape starts one sample in the background; scrapes soon after start no more.
        for _ in 0..5 {
            metrics.refresh_resident();
        }
        while metrics.resident.count.load(Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        metrics.refresh_resident();
        assert_eq!(metrics.resident.count.load(Relaxed), 1);
        assert!(metrics.render().contains(&format!(
            "ramnbd_export_resident_bytes{{export=\"a\"}} {}\n",
            3 * 4096
        )));
    }
}
