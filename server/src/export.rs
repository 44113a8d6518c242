//! Exports: named RAM disks with their attributes, and what they advertise to clients.
//!
//! Under a service manager with a file-descriptor store ([`Exports::with_store`]), each disk is
//! a memfd kept in the store: adopted with its data when one is stored under the export's name,
//! created and stored otherwise. See [`crate::systemd`].

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::Arc;

use crate::access::ExportAccess;
use crate::config::{BackingChoice, ExportConfig, MemoryConfig, format_size};
use crate::ramdisk::{BackingKind, MemoryBudget, MemoryOptions, RamDisk};
use crate::systemd::{self, Stored};

/// How to discard a stored disk, for messages.
pub const DISCARD_HINT: &str = "to discard the stored disk (its data is lost): systemctl stop \
     ramnbd.service, then start it again (systemd 254 and later also: systemctl clean \
     --what=fdstore ramnbd.service)";

/// Where an export's disk comes from.
#[derive(Debug)]
enum Origin {
    /// New private memory: the data end with the process.
    Private,
    /// A new memfd, to be put in the fd store.
    ToStore,
    /// The memfd of an earlier process, from the fd store, and the size it was created with.
    Stored(File, u64),
}

/// One named export: a RAM region plus the attributes clients see.
#[derive(Debug)]
pub struct Export {
    pub name: String,
    pub description: String,
    pub read_only: bool,
    /// Only clients that have started TLS may see or use it (`tls=require`).
    pub tls_required: bool,
    /// Who may see and use it.
    pub access: ExportAccess,
    pub disk: RamDisk,
    /// The disk was adopted from the service manager's fd store: it holds what an earlier
    /// process of this server wrote, newer than any image.
    pub adopted: bool,
}

impl Export {
    /// Creates the export's RAM region under `memory`'s policy, counting its pages against
    /// `global` (the server-wide cap, if any) and its own `max_memory`.
    pub fn new(
        config: &ExportConfig,
        memory: &MemoryConfig,
        global: Option<&Arc<MemoryBudget>>,
    ) -> io::Result<Self> {
        Self::open(config, memory, global, Origin::Private)
    }

    fn open(
        config: &ExportConfig,
        memory: &MemoryConfig,
        global: Option<&Arc<MemoryBudget>>,
        origin: Origin,
    ) -> io::Result<Self> {
        let own = config
            .max_memory
            .map(|limit| Arc::new(MemoryBudget::new(limit)));
        let mut options = MemoryOptions {
            budgets: own.into_iter().chain(global.cloned()).collect(),
            mlock: memory.mlock,
            hugepages: memory.hugepages,
            backing: memory.backing.resolve(|name| std::env::var_os(name)),
            name: config.name.clone(),
        };
        let adopted = matches!(origin, Origin::Stored(..));
        let disk = match origin {
            Origin::Private => RamDisk::with_options(config.size, &options)?,
            Origin::ToStore => {
                options.backing = BackingKind::Memfd;
                let disk = RamDisk::with_options(config.size, &options)?;
                let stored = disk.backing_fd().map(|fd| {
                    systemd::store(&systemd::disk_fd_name(&config.name, config.size), fd)
                });
                match stored {
                    Some(Ok(())) => tracing::info!(
                        export = %config.name,
                        "disk created and put in the service manager's fd store"
                    ),
                    Some(Err(err)) => tracing::warn!(
                        export = %config.name,
                        cause = %err,
                        "cannot put the disk in the fd store: its data will not survive a restart"
                    ),
                    None => {}
                }
                disk
            }
            Origin::Stored(file, stored_size) => {
                if stored_size != config.size {
                    // Failing would lose the data (systemd releases the store of a failed
                    // unit); serving the stored disk as it is keeps it.
                    tracing::error!(
                        export = %config.name,
                        "the stored disk is {} but the configuration says {}: serving the \
                         stored disk at its own size, unchanged; {DISCARD_HINT}",
                        format_size(stored_size),
                        format_size(config.size),
                    );
                }
                let disk = RamDisk::adopt(file.into(), stored_size, &options).map_err(|err| {
                    io::Error::new(
                        err.kind(),
                        format!("cannot adopt the stored disk: {err}; {DISCARD_HINT}"),
                    )
                })?;
                tracing::info!(
                    export = %config.name,
                    size = stored_size,
                    held_bytes = disk.allocated_bytes(),
                    "adopted stored disk"
                );
                disk
            }
        };
        Ok(Self {
            name: config.name.clone(),
            description: config.description.clone(),
            read_only: config.read_only,
            tls_required: config.tls_required,
            access: config.access.clone(),
            disk,
            adopted,
        })
    }

    pub fn size(&self) -> u64 {
        self.disk.size()
    }
}

/// All exports of a server, in configuration order, looked up by name.
#[derive(Debug, Default)]
pub struct Exports {
    list: Vec<Arc<Export>>,
    by_name: HashMap<String, usize>,
    /// The server-wide memory cap, shared by every export's disk.
    global_budget: Option<Arc<MemoryBudget>>,
}

impl Exports {
    /// Creates every export's RAM region. Names must be unique (the config checks this).
    pub fn new(configs: &[ExportConfig]) -> io::Result<Self> {
        Self::with_memory(configs, &MemoryConfig::default())
    }

    /// Like `new`, under a server-wide memory policy.
    pub fn with_memory(configs: &[ExportConfig], memory: &MemoryConfig) -> io::Result<Self> {
        Self::create(configs, memory, None)
    }

    /// Like `with_memory`, with every disk in the service manager's fd store: adopted from
    /// `stored` where it holds one for the export, created and stored otherwise.
    pub fn with_store(
        configs: &[ExportConfig],
        memory: &MemoryConfig,
        stored: &mut Stored,
    ) -> io::Result<Self> {
        Self::create(configs, memory, Some(stored))
    }

    fn create(
        configs: &[ExportConfig],
        memory: &MemoryConfig,
        mut stored: Option<&mut Stored>,
    ) -> io::Result<Self> {
        let mut exports = Self {
            global_budget: memory
                .max_memory
                .map(|limit| Arc::new(MemoryBudget::new(limit))),
            ..Self::default()
        };
        for config in configs {
            let global = exports.global_budget.as_ref();
            let origin = match stored.as_deref_mut() {
                None => Origin::Private,
                Some(stored) => match stored.take_disk(&config.name) {
                    Some((file, size)) => Origin::Stored(file, size),
                    // `backing = "anonymous"` is an explicit choice of memory that ends with
                    // the process, fd store or not.
                    None if memory.backing == BackingChoice::Anonymous => Origin::Private,
                    None => Origin::ToStore,
                },
            };
            let export = Export::open(config, memory, global, origin).map_err(|err| {
                io::Error::new(err.kind(), format!("export {:?}: {err}", config.name))
            })?;
            exports
                .by_name
                .insert(config.name.clone(), exports.list.len());
            exports.list.push(Arc::new(export));
        }
        Ok(exports)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Export>> {
        self.by_name.get(name).map(|&i| &self.list[i])
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.list.iter()
    }

    /// Bytes held by all exports, and the server-wide cap if there is one.
    pub fn memory_usage(&self) -> (u64, Option<u64>) {
        let held = self.list.iter().map(|e| e.disk.allocated_bytes()).sum();
        (held, self.global_budget.as_ref().map(|b| b.limit_bytes()))
    }
}
