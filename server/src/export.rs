//! Exports: named RAM disks with their attributes, and what they advertise to clients.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use crate::config::{ExportConfig, MemoryConfig};
use crate::ramdisk::{MemoryBudget, MemoryOptions, RamDisk};

/// One named export: a RAM region plus the attributes clients see.
#[derive(Debug)]
pub struct Export {
    pub name: String,
    pub description: String,
    pub read_only: bool,
    pub disk: RamDisk,
}

impl Export {
    /// Creates the export's RAM region under `memory`'s policy, counting its pages against
    /// `global` (the server-wide cap, if any) and its own `max_memory`.
    pub fn new(
        config: &ExportConfig,
        memory: &MemoryConfig,
        global: Option<&Arc<MemoryBudget>>,
    ) -> io::Result<Self> {
        let own = config
            .max_memory
            .map(|limit| Arc::new(MemoryBudget::new(limit)));
        let options = MemoryOptions {
            budgets: own.into_iter().chain(global.cloned()).collect(),
            mlock: memory.mlock,
            hugepages: memory.hugepages,
            backing: memory.backing.resolve(|name| std::env::var_os(name)),
            name: config.name.clone(),
        };
        Ok(Self {
            name: config.name.clone(),
            description: config.description.clone(),
            read_only: config.read_only,
            disk: RamDisk::with_options(config.size, &options)?,
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
        let mut exports = Self {
            global_budget: memory
                .max_memory
                .map(|limit| Arc::new(MemoryBudget::new(limit))),
            ..Self::default()
        };
        for config in configs {
            let global = exports.global_budget.as_ref();
            let export = Export::new(config, memory, global).map_err(|err| {
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
