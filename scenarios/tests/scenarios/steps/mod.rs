//! Step definitions, one module per domain (not per feature).

pub mod accounting;
mod audit;
mod chain;
mod farm;
pub mod faults;
mod forged;
mod fraud;
mod interop;
mod lightning;
mod lookup_pages;
pub mod mining;
mod mint_store;
mod network;
pub mod redemption;
mod redemption_faults;
mod redemption_holds;
pub mod redemption_htlcs;
mod redemption_quotes;
mod redis;
mod reorg;
mod settlement;
mod settlement_faults;
mod share_window;
mod sniffer;
mod suggest_difficulty;
mod supervisor;
mod trim;

use std::str::FromStr;

use cucumber::Parameter;
use harness::Chain;

/// `{chain}`: `signet` or `regtest`.
#[derive(Debug, Clone, Copy, Parameter)]
#[param(name = "chain", regex = "signet|regtest")]
pub struct ChainParam(pub Chain);

impl FromStr for ChainParam {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(Self(s.parse()?))
    }
}

/// `{role}`: a supervised process of a stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Parameter)]
#[param(name = "role", regex = "bitcoind|redis")]
pub enum Role {
    Bitcoind,
    Redis,
}

impl Role {
    /// The process name in the stack (`stack.json`).
    pub fn process_name(self) -> &'static str {
        match self {
            Role::Bitcoind => "bitcoind",
            Role::Redis => "redis",
        }
    }
}

impl FromStr for Role {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "bitcoind" => Ok(Role::Bitcoind),
            "redis" => Ok(Role::Redis),
            other => anyhow::bail!("unknown role {other}"),
        }
    }
}
