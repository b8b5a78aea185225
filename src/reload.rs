//! Hot reload: watch `gateway.toml` (and the TLS files) through their parent directories —
//! editors and certbot replace files by rename — debounce, parse and validate fully, then
//! swap the whole snapshot. A bad file is logged and counted; the old snapshot keeps serving.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::gateway::Gateway;
use crate::tls::{load_certified_key, CertResolver};

/// Wait this long after the last file event before reloading (editors write in bursts).
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Reloads configuration and certificates into a running gateway.
pub struct Reloader {
    gateway: Arc<Gateway>,
    path: PathBuf,
    tls: Option<Arc<CertResolver>>,
}

/// Settings that only take effect on a restart, compared between snapshots.
fn restart_only(c: &Config) -> Vec<(&'static str, String)> {
    vec![
        ("server.listen", c.server.listen.to_string()),
        (
            "server.tls.listen",
            c.server
                .tls
                .as_ref()
                .map_or_else(|| "(none)".into(), |t| t.listen.to_string()),
        ),
        ("server.workers", c.server.workers.to_string()),
        ("admin.listen", c.admin.listen.to_string()),
        ("store.path", c.store.path.display().to_string()),
    ]
}

impl Reloader {
    /// A reloader for the gateway serving the config at `path`.
    pub fn new(gateway: Arc<Gateway>, path: PathBuf, tls: Option<Arc<CertResolver>>) -> Self {
        Reloader { gateway, path, tls }
    }

    /// Reads, validates and applies the config file. On error nothing changes.
    pub fn reload(&self) -> Result<(), String> {
        let result = self.try_reload();
        let metrics = &self.gateway.metrics;
        match &result {
            Ok(()) => {
                metrics.reloads_ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!(config = %self.path.display(), "configuration reloaded");
            }
            Err(e) => {
                metrics.reloads_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "configuration reload rejected; the previous configuration keeps serving");
            }
        }
        result
    }

    fn try_reload(&self) -> Result<(), String> {
        let new = Config::load(&self.path).map_err(|e| e.to_string())?;
        let current = self.gateway.runtime.load_full();
        let old = &current.config;
        let changed: Vec<String> = restart_only(old)
            .into_iter()
            .zip(restart_only(&new))
            .filter(|(a, b)| a.1 != b.1)
            .map(|(a, b)| format!("{} ({} → {})", a.0, a.1, b.1))
            .collect();
        if !changed.is_empty() {
            return Err(format!(
                "{} changed; restart keygate to apply this file (nothing was applied)",
                changed.join(", ")
            ));
        }
        if new.log.format != old.log.format || new.log.level != old.log.level {
            tracing::warn!(
                "[log] changes take effect on the next restart; the rest of the file is applied"
            );
        }
        if let (Some(resolver), Some(tls)) = (&self.tls, &new.server.tls) {
            resolver.set(load_certified_key(&tls.cert, &tls.key)?);
        }
        self.gateway.apply_config(new);
        Ok(())
    }

    /// Reloads only the TLS certificate (after its files changed).
    pub fn reload_certificate(&self) {
        let current = self.gateway.runtime.load();
        let (Some(resolver), Some(tls)) = (&self.tls, &current.config.server.tls) else {
            return;
        };
        match load_certified_key(&tls.cert, &tls.key) {
            Ok(key) => {
                resolver.set(key);
                tracing::info!(cert = %tls.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS certificate reload failed; keeping the current certificate")
            }
        }
    }

    /// The files and directories to watch: (directory, file name, is the config).
    fn watched(&self) -> Vec<(PathBuf, std::ffi::OsString, bool)> {
        let mut out = Vec::new();
        let mut add = |p: &Path, is_config: bool| {
            let dir = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if let Some(name) = p.file_name() {
                out.push((dir, name.to_os_string(), is_config));
            }
        };
        add(&self.path, true);
        if let Some(tls) = &self.gateway.runtime.load().config.server.tls {
            add(&tls.cert, false);
            add(&tls.key, false);
        }
        out
    }
}

/// What the file events since the last reload touched.
#[derive(Debug, Default, Clone, Copy)]
struct Pending {
    /// An event named the config file.
    config: bool,
    /// An event named a TLS file.
    cert: bool,
    /// An event named something else in a watched directory (maybe a symlink swap).
    other: bool,
}

/// Identity and version of a file, through symlinks: a swapped symlink or a rewritten file
/// gives another one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

fn fingerprint(path: &Path) -> Option<Fingerprint> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Fingerprint {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec(),
    })
}

/// Longest a reload waits for file events to stop (a busy directory must not starve it).
const MAX_DEBOUNCE: Duration = Duration::from_secs(2);

/// Starts watching; the returned watcher must be kept alive for as long as reloads should
/// happen.
///
/// Events naming the config or a TLS file trigger a reload. When one of those paths is a
/// symlink — a Kubernetes ConfigMap or Secret volume (`gateway.toml -> ..data/gateway.toml`,
/// updated by renaming a new `..data` into place) — no event names the file, so any event in
/// its directory makes the watcher compare the files it points to with what it saw before.
pub fn watch(reloader: Arc<Reloader>) -> notify::Result<RecommendedWatcher> {
    let watched = reloader.watched();
    let files: Vec<(PathBuf, bool)> = watched
        .iter()
        .map(|(dir, name, is_config)| (dir.join(name), *is_config))
        .collect();
    let symlinked = files
        .iter()
        .any(|(p, _)| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()));
    let (tx, mut rx) = mpsc::unbounded_channel::<Pending>();
    let names = watched.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        for path in &event.paths {
            let Some(name) = path.file_name() else {
                continue;
            };
            let pending = match names.iter().find(|(_, n, _)| n == name) {
                Some((_, _, true)) => Pending {
                    config: true,
                    ..Default::default()
                },
                Some((_, _, false)) => Pending {
                    cert: true,
                    ..Default::default()
                },
                None if symlinked => Pending {
                    other: true,
                    ..Default::default()
                },
                None => continue,
            };
            let _ = tx.send(pending);
        }
    })?;
    let mut dirs: Vec<&PathBuf> = watched.iter().map(|(d, _, _)| d).collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    let mut seen: Vec<Option<Fingerprint>> = files.iter().map(|(p, _)| fingerprint(p)).collect();
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut pending = first;
            // Debounce: a save is often several events; act once they stop.
            let give_up = tokio::time::Instant::now() + MAX_DEBOUNCE;
            loop {
                let quiet = (tokio::time::Instant::now() + DEBOUNCE).min(give_up);
                tokio::select! {
                    more = rx.recv() => match more {
                        Some(p) => {
                            pending.config |= p.config;
                            pending.cert |= p.cert;
                            pending.other |= p.other;
                        }
                        None => return,
                    },
                    _ = tokio::time::sleep_until(quiet) => break,
                }
            }
            let r = reloader.clone();
            let files = files.clone();
            let before = seen.clone();
            let Ok(now) = tokio::task::spawn_blocking(move || {
                let now: Vec<Option<Fingerprint>> =
                    files.iter().map(|(p, _)| fingerprint(p)).collect();
                let changed = |config: bool| {
                    pending.other
                        && files
                            .iter()
                            .zip(before.iter().zip(&now))
                            .any(|((_, c), (b, n))| *c == config && b != n)
                };
                if pending.config || changed(true) {
                    let _ = r.reload();
                } else if pending.cert || changed(false) {
                    r.reload_certificate();
                }
                now
            })
            .await
            else {
                continue;
            };
            seen = now;
        }
    });
    Ok(watcher)
}
