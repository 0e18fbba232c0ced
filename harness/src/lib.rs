//! hashpool-harness: stands up real bitcoind, Redis and (later) the pool roles as supervised
//! processes, and gives scenarios typed handles to drive them through their wire interfaces.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use harness::{Chain, HarnessConfig, Stack};
//! let config = HarnessConfig::load(None)?;
//! let stack = Stack::builder("demo", &config).chain(Chain::Signet).redis().start().await?;
//! let bitcoind = stack.bitcoind()?;
//! let address = stack.faucet()?.address().clone();
//! bitcoind.generate_to_address(1, &address).await?;
//! stack.shutdown(false).await?;
//! # Ok(()) }
//! ```

pub mod binaries;
pub mod bitcoind;
pub mod blocks;
pub mod chain_fixtures;
pub mod config;
pub mod demo;
pub mod ehash_api;
pub mod faucet;
pub mod fault_proxy;
pub mod fraud_replay;
pub mod http;
pub mod invariants;
pub mod keys;
pub mod lightning;
pub mod logs;
pub mod memory;
pub mod money_sweep;
pub mod ports;
pub mod process;
pub mod redis;
pub mod roles;
pub mod settlement_sweep;
pub mod sniffer;
pub mod soak;
pub mod sqlite_db;
pub mod stack;
pub mod stack_sweep;
pub mod stream_archive;
pub mod supervisor;
pub mod sv2_client;
pub mod sv2_miner;
pub mod sv2_raw;
pub mod wait;

pub use bitcoind::{Bitcoind, Chain};
pub use config::HarnessConfig;
pub use faucet::Faucet;
pub use stack::{Stack, StackBuilder, StackSummary};
pub use supervisor::{RestartPolicy, Supervised, SupervisorOptions};
