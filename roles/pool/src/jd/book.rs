//! Tokens and declarations: an allocation token is used for one declaration, a declaration's
//! job token for one `SetCustomMiningJob`. Both expire after [`TOKEN_LIFETIME`]. Memory is
//! bounded per job declaration connection (a connection past its count forgets its own oldest
//! waiting declaration) and in total (a full book refuses new declarations rather than
//! forgetting anyone else's).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bitcoin::Transaction;

/// Tokens and declarations expire after this long unused.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(600);
/// Unused allocation tokens one connection may hold (its oldest is forgotten first).
pub const MAX_TOKENS_PER_CONNECTION: usize = 16;
/// Declarations of one connection waiting for their `SetCustomMiningJob`; one more forgets the
/// connection's oldest (a proxy declares for every channel of its farm on one connection, and
/// a declaration whose channel went away is never set).
pub const MAX_DECLARED_PER_CONNECTION: usize = 8;
/// Bytes of transactions all waiting declarations may hold together.
pub const MAX_DECLARED_BYTES: usize = 64 << 20;

/// A job an operator declared and the pool accepted.
#[derive(Debug)]
pub struct DeclaredTemplate {
    /// Block height (from the coinbase's BIP34 push).
    pub height: u64,
    /// Header version declared.
    pub version: u32,
    /// The declared coinbase, with a zero extranonce.
    pub coinbase: Transaction,
    /// Its outputs, serialized as `SetCustomMiningJob` carries them.
    pub coinbase_outputs: Vec<u8>,
    /// Raw transactions in block order.
    pub transactions: Vec<Vec<u8>>,
    /// The coinbase's merkle path over their txids (internal order).
    pub merkle_path: Vec<[u8; 32]>,
    /// What the pool requires its payout script be paid (the block subsidy; the pool cannot
    /// know the fees of transactions it has no inputs for).
    pub payout_sats: u64,
}

impl DeclaredTemplate {
    fn bytes(&self) -> usize {
        self.transactions.iter().map(Vec::len).sum()
    }
}

#[derive(Default)]
struct Book {
    /// Allocation token -> (when, connection).
    allocated: HashMap<Vec<u8>, (Instant, u64)>,
    /// Job token -> (when, connection, declaration).
    declared: HashMap<Vec<u8>, (Instant, u64, Arc<DeclaredTemplate>)>,
    declared_bytes: usize,
}

impl Book {
    fn expire(&mut self) {
        self.allocated
            .retain(|_, (t, _)| t.elapsed() < TOKEN_LIFETIME);
        let mut freed = 0;
        self.declared.retain(|_, (t, _, d)| {
            let keep = t.elapsed() < TOKEN_LIFETIME;
            if !keep {
                freed += d.bytes();
            }
            keep
        });
        self.declared_bytes -= freed;
    }
}

/// Why a declaration cannot be kept.
#[derive(Debug, PartialEq, Eq)]
pub enum BookFull {
    /// All waiting declarations hold [`MAX_DECLARED_BYTES`] (or the book is unusable).
    Pool,
}

/// The pool's tokens and declarations.
#[derive(Default)]
pub struct JobBook {
    inner: Mutex<Book>,
}

fn random_token() -> Vec<u8> {
    (0..16)
        .map(|_| bitcoin::secp256k1::rand::random::<u8>())
        .collect()
}

impl JobBook {
    /// A fresh allocation token for connection `conn`.
    pub fn allocate(&self, conn: u64) -> Vec<u8> {
        let token = random_token();
        if let Ok(mut b) = self.inner.lock() {
            b.expire();
            let mine: Vec<(Vec<u8>, Instant)> = b
                .allocated
                .iter()
                .filter(|(_, (_, c))| *c == conn)
                .map(|(k, (t, _))| (k.clone(), *t))
                .collect();
            if mine.len() >= MAX_TOKENS_PER_CONNECTION {
                if let Some((oldest, _)) = mine.into_iter().min_by_key(|(_, t)| *t) {
                    b.allocated.remove(&oldest);
                }
            }
            b.allocated.insert(token.clone(), (Instant::now(), conn));
        }
        token
    }

    /// Use an allocation token of connection `conn` for a declaration (once).
    pub fn take_allocated(&self, token: &[u8], conn: u64) -> bool {
        let Ok(mut b) = self.inner.lock() else {
            return false;
        };
        match b.allocated.get(token) {
            Some((t, c)) if *c == conn && t.elapsed() < TOKEN_LIFETIME => {
                b.allocated.remove(token);
                true
            }
            _ => false,
        }
    }

    /// Keep a declaration of connection `conn`; returns the job token `SetCustomMiningJob`
    /// must carry.
    pub fn declare(&self, t: DeclaredTemplate, conn: u64) -> Result<Vec<u8>, BookFull> {
        let mut b = self.inner.lock().map_err(|_| BookFull::Pool)?;
        b.expire();
        let own: Vec<(Instant, Vec<u8>)> = b
            .declared
            .iter()
            .filter(|(_, (_, c, _))| *c == conn)
            .map(|(token, (t, _, _))| (*t, token.clone()))
            .collect();
        if own.len() >= MAX_DECLARED_PER_CONNECTION {
            if let Some((_, oldest)) = own.into_iter().min() {
                if let Some((_, _, d)) = b.declared.remove(&oldest) {
                    b.declared_bytes -= d.bytes();
                }
            }
        }
        if b.declared_bytes + t.bytes() > MAX_DECLARED_BYTES {
            return Err(BookFull::Pool);
        }
        let token = random_token();
        b.declared_bytes += t.bytes();
        b.declared
            .insert(token.clone(), (Instant::now(), conn, Arc::new(t)));
        Ok(token)
    }

    /// The declaration a `SetCustomMiningJob` token names (once, before it expires).
    pub fn take_declared(&self, token: &[u8]) -> Option<Arc<DeclaredTemplate>> {
        let mut b = self.inner.lock().ok()?;
        let (t, _, d) = b.declared.remove(token)?;
        b.declared_bytes -= d.bytes();
        (t.elapsed() < TOKEN_LIFETIME).then_some(d)
    }
}
