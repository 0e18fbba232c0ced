//! `mining.suggest_difficulty`: a miner that suggests a difficulty gets shares no easier than
//! that, checked on the accepted shares' own hashes (not on what the proxy or pool say).

use cucumber::{given, then};
use harness::roles::MinerOptions;

use super::mining::CAPPED_HASHRATE;
use crate::world::HarnessWorld;

#[given(expr = "a miner {string} behind proxy {string} that suggests difficulty {float}")]
async fn suggesting(
    w: &mut HarnessWorld,
    name: String,
    proxy: String,
    d: f64,
) -> anyhow::Result<()> {
    let opts = MinerOptions {
        hashrate: Some(CAPPED_HASHRATE),
        suggest_difficulty: Some(d),
        ..MinerOptions::default()
    };
    w.default_stack_mut()?
        .start_miner(&name, &proxy, &opts)
        .await?;
    Ok(())
}

/// SV1 difficulty of a share hash (display hex): difficulty 1 is `0xffff * 2^208`.
fn hash_difficulty(display_hex: &str) -> anyhow::Result<f64> {
    let bytes = hex::decode(display_hex)?;
    anyhow::ensure!(bytes.len() == 32, "hash {display_hex} is not 32 bytes");
    let value = bytes
        .iter()
        .fold(0.0f64, |acc, b| acc * 256.0 + f64::from(*b));
    Ok(65535.0 * 2f64.powi(208) / value.max(1.0))
}

#[then(expr = "every share miner {string} saw accepted has difficulty at least {float}")]
async fn accepted_at_least(w: &mut HarnessWorld, name: String, d: f64) -> anyhow::Result<()> {
    let log = w.default_stack()?.miner(&name)?.log();
    anyhow::ensure!(
        !log.accepted.is_empty(),
        "miner {name} has no accepted share"
    );
    for h in &log.accepted {
        let got = hash_difficulty(h)?;
        anyhow::ensure!(
            got >= d * (1.0 - 1e-9),
            "share {h} of miner {name} has difficulty {got:.3e}, below the {d:.3e} it suggested"
        );
    }
    Ok(())
}
