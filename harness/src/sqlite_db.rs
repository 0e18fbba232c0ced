//! A role's SQLite database seen from outside the role: its logical size, and a write lock
//! held by the harness (another process, as far as the role can tell), so that every writer
//! of the role waits its busy timeout and fails while it is held.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::{anyhow, Context};
use rusqlite::{Connection, OpenFlags};

/// Bytes the database holds: pages in use (the write-ahead log included) times the page size.
pub fn logical_size(path: &Path) -> anyhow::Result<u64> {
    let c = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("opening {}", path.display()))?;
    let pages: u64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let free: u64 = c.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let size: u64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok((pages - free) * size)
}

/// The write lock on a database, held by a thread of the harness until released.
#[derive(Debug)]
pub struct WriteLock {
    path: PathBuf,
    release: mpsc::Sender<()>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl WriteLock {
    /// Take the write lock (`BEGIN IMMEDIATE`) on `path`; returns once it is held.
    pub fn take(path: &Path) -> anyhow::Result<Self> {
        let (held_tx, held_rx) = mpsc::channel::<anyhow::Result<()>>();
        let (release, release_rx) = mpsc::channel::<()>();
        let p = path.to_path_buf();
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            let take = || -> anyhow::Result<Connection> {
                let c = Connection::open(&p).with_context(|| format!("opening {}", p.display()))?;
                c.busy_timeout(std::time::Duration::from_secs(30))?;
                c.execute_batch("BEGIN IMMEDIATE")?;
                Ok(c)
            };
            let conn = match take() {
                Ok(c) => {
                    let _ = held_tx.send(Ok(()));
                    c
                }
                Err(e) => {
                    let _ = held_tx.send(Err(anyhow!("{e:#}")));
                    return Err(e);
                }
            };
            // Held until released (or the harness drops the lock).
            let _ = release_rx.recv();
            conn.execute_batch("ROLLBACK")?;
            Ok(())
        });
        held_rx
            .recv()
            .map_err(|_| anyhow!("the lock thread ended before taking the lock"))??;
        Ok(Self {
            path: path.to_path_buf(),
            release,
            thread: Some(thread),
        })
    }

    /// Let go of the lock.
    pub fn release(mut self) -> anyhow::Result<()> {
        let _ = self.release.send(());
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow!("the lock thread of {} panicked", self.path.display()))?,
            None => Ok(()),
        }
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        let _ = self.release.send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_write_lock_makes_other_writers_busy_until_released() {
        let dir = std::env::temp_dir().join(format!("hashpool-sqlite-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("db.sqlite");
        let c = Connection::open(&path).unwrap();
        c.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (x INTEGER);")
            .unwrap();
        let lock = WriteLock::take(&path).unwrap();
        c.busy_timeout(std::time::Duration::from_millis(50))
            .unwrap();
        let busy = c.execute("INSERT INTO t VALUES (1)", []).unwrap_err();
        assert!(busy.to_string().contains("locked"), "{busy}");
        lock.release().unwrap();
        c.execute("INSERT INTO t VALUES (1)", []).unwrap();
        assert!(logical_size(&path).unwrap() > 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
