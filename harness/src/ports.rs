//! Port allocation that is safe across stacks, threads and test binaries: a port is handed out
//! only while this process holds an exclusive `flock` on `<lock dir>/<port>.lock` and a bind
//! check succeeds. The lock dies with the process, so a crashed run leaks nothing.

use std::fs::{File, OpenOptions};
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use rand::Rng;

/// A reserved port; the reservation lasts as long as this value.
#[derive(Debug)]
pub struct PortLease {
    port: u16,
    _lock: Flock<File>,
}

impl PortLease {
    /// The port number.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// Hands out ports from `[min, max]`, outside the kernel's ephemeral range.
#[derive(Debug, Clone)]
pub struct PortAllocator {
    lock_dir: PathBuf,
    min: u16,
    max: u16,
}

/// No port could be reserved.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// The lock directory could not be created.
    #[error("cannot create port lock directory {dir}: {source}")]
    LockDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Every port in the range is locked or bound.
    #[error("no free port in {min}-{max} after {tries} tries: widen HASHPOOL_HARNESS__PORT_MIN/MAX or stop other stacks")]
    Exhausted {
        /// Range start.
        min: u16,
        /// Range end.
        max: u16,
        /// Ports tried.
        tries: usize,
    },
}

impl PortAllocator {
    /// An allocator over `[min, max]` using lock files in `lock_dir`.
    pub fn new(lock_dir: &Path, min: u16, max: u16) -> Self {
        Self {
            lock_dir: lock_dir.to_path_buf(),
            min,
            max,
        }
    }

    /// Reserve one free port.
    pub fn allocate(&self) -> Result<PortLease, PortError> {
        std::fs::create_dir_all(&self.lock_dir).map_err(|source| PortError::LockDir {
            dir: self.lock_dir.clone(),
            source,
        })?;
        let span = usize::from(self.max - self.min) + 1;
        let start = rand::thread_rng().gen_range(0..span);
        let tries = span.min(2000);
        for i in 0..tries {
            let port = self.min + ((start + i) % span) as u16;
            if let Some(lease) = self.try_port(port) {
                return Ok(lease);
            }
        }
        Err(PortError::Exhausted {
            min: self.min,
            max: self.max,
            tries,
        })
    }

    fn try_port(&self, port: u16) -> Option<PortLease> {
        let path = self.lock_dir.join(format!("{port}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .ok()?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).ok()?;
        // Locked by us; is something outside the harness using it?
        TcpListener::bind(("127.0.0.1", port)).ok()?;
        Some(PortLease { port, _lock: lock })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_distinct_until_dropped() {
        let dir = std::env::temp_dir().join(format!("hh-ports-{}", std::process::id()));
        let alloc = PortAllocator::new(&dir, 24000, 24003);
        let leases: Vec<_> = (0..4).map(|_| alloc.allocate().unwrap()).collect();
        let mut ports: Vec<u16> = leases.iter().map(PortLease::port).collect();
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), 4);
        assert!(matches!(alloc.allocate(), Err(PortError::Exhausted { .. })));
        drop(leases);
        assert!(alloc.allocate().is_ok());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_bound_port_is_skipped() {
        let dir = std::env::temp_dir().join(format!("hh-ports-bound-{}", std::process::id()));
        let busy = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = busy.local_addr().unwrap().port();
        let alloc = PortAllocator::new(&dir, port, port);
        assert!(alloc.allocate().is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
