//! Images: snapshots of exports on disk, for reboots and power loss.
//!
//! An export with `image = PATH` is loaded from it at start (if the file exists) and saved to
//! it on stop (after the sessions have finished, so their last writes are in), on SIGHUP
//! (what `systemctl reload` sends) and every `save-interval`. The file format and the
//! crash-safety and consistency rules are in [`file`]; how saves of big disks avoid blocking
//! the runtime: each runs on a blocking thread (`spawn_blocking`), one at a time per export.
//!
//! The server's start calls [`Images::start`] (SIGHUP and timers), then [`Images::load`]
//! before it serves; its stop calls [`Images::save_on_stop`].

pub mod file;
mod progress;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::{Config, format_size};
use crate::export::{Export, Exports};
use crate::logsafe::Untrusted;
use crate::shutdown::{Phase, Shutdown};
use file::{Cancel, ImageError, Loaded};
use progress::{Progress, format_mib};

/// Why a save runs, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Stop,
    Reload,
    Interval,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Stop => "stop",
            Reason::Reload => "SIGHUP",
            Reason::Interval => "save-interval",
        }
    }
}

/// One export with an image.
#[derive(Debug)]
struct Image {
    export: Arc<Export>,
    path: PathBuf,
    interval: Option<Duration>,
    /// Saves of this export, one at a time.
    saving: tokio::sync::Mutex<()>,
    /// Set once the image is loaded (or found missing): before that, a save would write a
    /// half-loaded disk over the image.
    ready: AtomicBool,
}

/// The exports that have images; see the module documentation.
#[derive(Debug)]
pub struct Images {
    list: Vec<Arc<Image>>,
    /// Set by a third stop signal: saves in progress give up (their old images stay).
    cancel: Arc<Cancel>,
}

impl Images {
    /// Finds the exports with an image, installs the SIGHUP handler (always: SIGHUP's default
    /// action would end the server) and starts the save-interval timers. Saves wait for
    /// [`Images::load`].
    pub fn start(
        config: &Config,
        exports: &Exports,
        shutdown: Shutdown,
    ) -> anyhow::Result<Arc<Images>> {
        let list = config
            .exports
            .iter()
            .filter_map(|ec| {
                let path = ec.image.clone()?;
                let export = exports.get(&ec.name)?;
                Some(Arc::new(Image {
                    export: Arc::clone(export),
                    path,
                    interval: ec.save_interval.or(config.save_interval),
                    saving: tokio::sync::Mutex::new(()),
                    ready: AtomicBool::new(false),
                }))
            })
            .collect();
        let images = Arc::new(Images {
            list,
            cancel: Arc::new(Cancel::default()),
        });
        let mut hangup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
        let on_hangup = Arc::clone(&images);
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = hangup.recv() => {}
                    () = stop.reached(Phase::Stopping) => return,
                }
                if on_hangup.list.is_empty() {
                    tracing::info!("SIGHUP received: no export has an image, nothing to save");
                    continue;
                }
                tracing::info!("SIGHUP received: saving every export's image");
                on_hangup.save_all(Reason::Reload).await;
            }
        });
        for image in &images.list {
            if let Some(every) = image.interval.filter(|d| !d.is_zero()) {
                let image = Arc::clone(image);
                let cancel = Arc::clone(&images.cancel);
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    let mut tick =
                        tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            _ = tick.tick() => {}
                            () = stop.reached(Phase::Stopping) => return,
                        }
                        let _ = save(&image, &cancel, Reason::Interval).await;
                    }
                });
            }
        }
        let cancel = Arc::clone(&images.cancel);
        tokio::spawn(async move {
            shutdown.reached(Phase::Aborting).await;
            cancel.cancel();
        });
        Ok(images)
    }

    /// Loads every image that exists, one after the other, and checks that each image's
    /// directory takes the temporary file a save needs. Any error refuses the start: nothing
    /// is overwritten that could not be read back.
    pub async fn load(&self) -> anyhow::Result<()> {
        for image in &self.list {
            let task = Arc::clone(image);
            tokio::task::spawn_blocking(move || load(&task))
                .await
                .context("loading an image")??;
            image.ready.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Saves every export's image; after a failure, goes on with the others. Returns an
    /// error naming the images that failed.
    pub async fn save_on_stop(&self) -> anyhow::Result<()> {
        let failed = self.save_all(Reason::Stop).await;
        if !failed.is_empty() {
            anyhow::bail!(
                "saving failed for {} (see the errors above; the old images are kept)",
                failed.join(", ")
            );
        }
        Ok(())
    }

    /// Saves every image in turn; returns the paths of those that failed.
    async fn save_all(&self, reason: Reason) -> Vec<String> {
        let mut failed = Vec::new();
        for image in &self.list {
            if save(image, &self.cancel, reason).await.is_err() {
                failed.push(image.path.display().to_string());
            }
        }
        failed
    }
}

fn load(image: &Image) -> Result<(), ImageError> {
    let name = &image.export.name;
    let path = &image.path;
    // A read-only export is never saved: its image's directory need not be writable.
    if !image.export.read_only {
        for leftover in file::prepare_directory(path)? {
            tracing::warn!(
                file = %leftover.display(),
                "removed the temporary file of an interrupted save; the image it was to replace is kept"
            );
        }
    }
    if image.export.adopted {
        // After a restart the disk comes back from the fd store with every write up to the
        // last moment; the image is older and would undo them.
        tracing::info!(
            export = %Untrusted::text(name),
            image = %path.display(),
            "disk adopted from the fd store: the image is not loaded (the disk is newer)"
        );
        return Ok(());
    }
    let mut progress = Progress::new(format!("loading image {}", path.display()));
    let started = std::time::Instant::now();
    let loaded = file::load(&image.export.disk, path, &mut |done, total| {
        progress.update(done, total);
    });
    progress.finish();
    match loaded? {
        Loaded::Missing => tracing::info!(
            export = %Untrusted::text(name),
            image = %path.display(),
            "no image yet: the export starts empty and is saved there"
        ),
        Loaded::Data(bytes) => tracing::info!(
            export = %Untrusted::text(name),
            image = %path.display(),
            "loaded image: {} of data in {:.2} s",
            format_mib(bytes),
            started.elapsed().as_secs_f64()
        ),
    }
    if image.export.read_only {
        tracing::info!(export = %Untrusted::text(name), "read-only export: its image is loaded but never saved");
    }
    Ok(())
}

/// Saves one image, if it is loaded, writable and (for a periodic save) changed; logs the
/// outcome.
async fn save(image: &Arc<Image>, cancel: &Arc<Cancel>, reason: Reason) -> Result<(), ()> {
    let _one = image.saving.lock().await;
    let export = &image.export;
    if !image.ready.load(Ordering::Acquire) || export.read_only {
        return Ok(());
    }
    if reason == Reason::Interval && !export.disk.changed_since_saved() {
        tracing::debug!(export = %Untrusted::text(&export.name), "unchanged since the last save, not saved");
        return Ok(());
    }
    tracing::info!(
        export = %Untrusted::text(&export.name),
        reason = reason.as_str(),
        "saving image {}",
        image.path.display()
    );
    let task = Arc::clone(image);
    let cancel = Arc::clone(cancel);
    let what = format!("saving image {}", image.path.display());
    let result = tokio::task::spawn_blocking(move || {
        let mut progress = Progress::new(what);
        let saved = file::save(
            &task.export.disk,
            &task.path,
            &cancel,
            &mut |done, total| {
                progress.update(done, total);
            },
        );
        progress.finish();
        saved
    })
    .await;
    let saved = match result {
        Ok(Ok(saved)) => saved,
        Ok(Err(err)) => {
            tracing::error!(export = %Untrusted::text(&export.name), reason = reason.as_str(), "{err}");
            return Err(());
        }
        Err(err) => {
            tracing::error!(export = %Untrusted::text(&export.name), image = %image.path.display(), "save failed: {err}");
            return Err(());
        }
    };
    tracing::info!(
        export = %Untrusted::text(&export.name),
        reason = reason.as_str(),
        passes = saved.passes,
        copied = %format_mib(saved.copied_bytes),
        final_pages = saved.pause.pages,
        freezing_ms = saved.pause.freezing.as_secs_f64() * 1000.0,
        "saved image {}: {} of data ({} export) in {:.2} s, longest pause {:.1} ms",
        image.path.display(),
        format_mib(saved.data_bytes),
        format_size(export.size()),
        saved.elapsed.as_secs_f64(),
        saved.pause.length.as_secs_f64() * 1000.0,
    );
    Ok(())
}
