//! Building a declaration from one node template (the coinbase around the pool's outputs,
//! the template's transactions), and the custom job once the pool accepted it.

use anyhow::{anyhow, Context};
use bitcoin::consensus::encode::deserialize;
use bitcoin::hashes::Hash;
use bitcoin::{Amount, Transaction, TxOut};
use stratum_apps::stratum_core::binary_sv2::{B064KOwned, Seq064KOwned, U256Owned};
use stratum_apps::stratum_core::channels_sv2::chain_tip::ChainTip;
use stratum_apps::stratum_core::channels_sv2::server::jobs::factory::JobFactory;
use stratum_apps::stratum_core::job_declaration_sv2::DeclareMiningJobOwned;
use template_fraud::{FraudInputs, FraudKind};

use super::{ChannelShape, DeclaredWork};
use crate::node::NodeTemplate;

/// The job for one node template: the declaration and, once a token is known, the custom job.
pub(super) struct Job {
    pub(super) template: sv2_templates::Converted,
    pub(super) outputs: Vec<TxOut>,
    pub(super) declare: DeclareMiningJobOwned,
    pub(super) transactions: Vec<Vec<u8>>,
    pub(super) min_ntime: u32,
    pub(super) height: u64,
}

pub(super) fn build(
    t: &NodeTemplate,
    fraud: Option<FraudKind>,
    pool_outputs: Vec<TxOut>,
    token: &[u8],
    full_extranonce_size: usize,
    min_ntime: u32,
) -> anyhow::Result<Job> {
    let mut gbt = t.gbt.clone();
    if let Some(kind) = fraud {
        let inputs = FraudInputs {
            tip_coinbase: t.tip_coinbase,
        };
        template_fraud::apply(kind, &mut gbt, &inputs)?;
    }
    let template = sv2_templates::convert(&gbt, u64::from(gbt.curtime))?;
    let mut outputs = pool_outputs;
    let first = outputs
        .first_mut()
        .context("the pool named no payout output")?;
    first.value = Amount::from_sat(template.template.coinbase_tx_value_remaining);
    if fraud == Some(FraudKind::NoPoolPayout) {
        first.script_pubkey = template_fraud::anyone_script();
    }
    outputs.truncate(1);
    let factory = JobFactory::new(true, None, None);
    let (prefix, suffix) = factory
        .new_coinbase_tx_prefix_and_suffix(
            template.template.clone(),
            outputs.clone(),
            full_extranonce_size,
        )
        .map_err(|e| anyhow!("coinbase: {e:?}"))?;
    let transactions = gbt
        .transactions
        .iter()
        .map(|x| hex::decode(&x.data).context("template transaction is not hex"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let wtxids = transactions
        .iter()
        .map(|raw| {
            let tx: Transaction =
                deserialize(raw).context("template transaction does not decode")?;
            Ok(U256Owned::from(tx.compute_wtxid().to_byte_array()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let declare = DeclareMiningJobOwned {
        request_id: 0,
        mining_job_token: token.to_vec().try_into().map_err(|e| anyhow!("{e:?}"))?,
        version: gbt.version,
        coinbase_tx_prefix: B064KOwned::try_from(prefix).map_err(|e| anyhow!("{e:?}"))?,
        coinbase_tx_suffix: B064KOwned::try_from(suffix).map_err(|e| anyhow!("{e:?}"))?,
        wtxid_list: Seq064KOwned::new(wtxids).map_err(|e| anyhow!("{e:?}"))?,
        excess_data: B064KOwned::try_from(Vec::new()).map_err(|e| anyhow!("{e:?}"))?,
    };
    Ok(Job {
        template,
        outputs,
        declare,
        transactions,
        min_ntime,
        height: t.gbt.height,
    })
}

impl Job {
    pub(super) fn custom(
        self,
        shape: &ChannelShape,
        token: Vec<u8>,
        fraud: Option<FraudKind>,
    ) -> anyhow::Result<DeclaredWork> {
        let factory = JobFactory::new(true, None, None);
        let tip = ChainTip::new(
            self.template.prev_hash.prev_hash.clone(),
            self.template.nbits,
            self.min_ntime,
        );
        let set_custom = factory
            .new_custom_job(
                shape.channel_id,
                0,
                token.try_into().map_err(|e| anyhow!("{e:?}"))?,
                tip,
                self.template.template,
                self.outputs,
                shape.full_extranonce_size,
            )
            .map_err(|e| anyhow!("custom job: {e:?}"))?;
        let mut set_custom = set_custom;
        if fraud == Some(FraudKind::UndeclaredCoinbase) {
            // Another coinbase than the declared one: one byte of the pool tag changed.
            let mut prefix = set_custom.coinbase_prefix.as_bytes().to_vec();
            let at = prefix.len().saturating_sub(2);
            if let Some(b) = prefix.get_mut(at) {
                *b ^= 0x20;
            }
            set_custom.coinbase_prefix = prefix.try_into().map_err(|e| anyhow!("{e:?}"))?;
            tracing::info!(
                "fraud undeclared-coinbase: the custom job's coinbase is not the declared one"
            );
        }
        Ok(DeclaredWork {
            set_custom,
            height: self.height,
        })
    }
}
