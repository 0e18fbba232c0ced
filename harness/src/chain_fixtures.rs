//! The chain fixtures compiled into the harness (`harness chain-fixtures`): regtest and signet
//! chains paying the faucet, the signet rewards chain above them (the pool node's liquidity
//! and rewards), and the rewards chain's pre-mined fork.

use std::path::Path;

use crate::bitcoind::{chain_fixture, Chain};

/// Write the chain fixtures: regtest, signet, and the signet rewards chain above it.
pub fn write_all(out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    let faucet = |chain: Chain| {
        crate::faucet::p2wpkh_address(&crate::bitcoind::faucet_secret_key(), chain.network())
            .script_pubkey()
    };
    let write = |name: &str, what: &str, blocks: &[bitcoin::Block], start: std::time::Instant| {
        let file = out.join(name);
        std::fs::write(&file, chain_fixture::render(what, blocks))?;
        println!(
            "{name}: {} blocks in {:.1} s -> {}",
            blocks.len(),
            start.elapsed().as_secs_f64(),
            file.display()
        );
        anyhow::Ok(())
    };
    let mut signet = Vec::new();
    for chain in [Chain::Regtest, Chain::Signet] {
        let start = std::time::Instant::now();
        let blocks = chain_fixture::build(chain, chain.premine_blocks() as u32, &faucet(chain))?;
        write(
            &format!("{chain}.blocks"),
            &format!("{chain}: blocks above genesis, each paying 50 BTC to the harness faucet"),
            &blocks,
            start,
        )?;
        if chain == Chain::Signet {
            signet = blocks;
        }
    }
    let start = std::time::Instant::now();
    let tip = signet
        .last()
        .map(bitcoin::Block::block_hash)
        .ok_or_else(|| anyhow::anyhow!("no signet blocks"))?;
    let address = |a: &str| -> anyhow::Result<bitcoin::ScriptBuf> {
        Ok(
            a.parse::<bitcoin::Address<bitcoin::address::NetworkUnchecked>>()?
                .require_network(bitcoin::Network::Signet)?
                .script_pubkey(),
        )
    };
    let subsidy = bitcoin::Amount::from_btc(50.0)?;
    let mut payouts = vec![(
        address(crate::lightning::POOL_NODE_LIQUIDITY_ADDRESS)?,
        bitcoin::Amount::from_sat(crate::lightning::LIQUIDITY_SATS),
    )];
    payouts.extend(std::iter::repeat_n(
        (
            address(crate::lightning::POOL_NODE_ADDRESS)?,
            bitcoin::Amount::from_sat(crate::lightning::REWARD_SATS),
        ),
        crate::lightning::REWARD_BLOCKS as usize,
    ));
    payouts.extend(std::iter::repeat_n(
        (faucet(Chain::Signet), subsidy),
        crate::lightning::MATURITY as usize,
    ));
    let first = signet.len() as u32 + 1;
    let rewards = chain_fixture::build_above(Chain::Signet, tip, first, &payouts)?;
    write(
        "signet-rewards.blocks",
        &format!(
            "signet rewards: above signet.blocks, the pool node's liquidity ({} sat to its second address), {} coinbases of {} sat to its payout address, then {} to the faucet to mature them",
            crate::lightning::LIQUIDITY_SATS,
            crate::lightning::REWARD_BLOCKS,
            crate::lightning::REWARD_SATS,
            crate::lightning::MATURITY
        ),
        &rewards,
        start,
    )?;
    // The fork: from the block before the last reward, long enough to mature its own blocks
    // past the rewards chain's tip and what a scenario mines.
    let start = std::time::Instant::now();
    let last_reward = crate::lightning::REWARD_BLOCKS as usize; // index in `rewards`
    let fork_parent = rewards[last_reward - 1].block_hash();
    let fork_first = first + last_reward as u32;
    let branch = vec![(faucet(Chain::Signet), subsidy); crate::stack::REWARDS_FORK_BLOCKS];
    let fork = chain_fixture::build_above(Chain::Signet, fork_parent, fork_first, &branch)?;
    write(
        "signet-rewards-fork.blocks",
        &format!(
            "signet rewards fork: a branch of the rewards chain from height {}, replacing its last reward, {} blocks to the faucet",
            fork_first,
            crate::stack::REWARDS_FORK_BLOCKS
        ),
        &fork,
        start,
    )?;
    println!("rebuild the harness (the fixtures are compiled in); the next run loads them into new chain caches");
    Ok(())
}
