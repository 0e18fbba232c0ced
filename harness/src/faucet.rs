//! A faucet for chains whose bitcoind has no wallet: it owns the key the pre-mined coinbases
//! pay, finds its coins with `scantxoutset`, signs P2WPKH spends with rust-bitcoin and sends
//! them with `sendrawtransaction`.

use std::collections::HashSet;
use std::str::FromStr;

use anyhow::{anyhow, Context};
use bitcoin::absolute::LockTime;
use bitcoin::consensus::encode::serialize_hex;
use bitcoin::hashes::Hash;
use bitcoin::secp256k1::{Message, Secp256k1, SecretKey};
use bitcoin::sighash::{EcdsaSighashType, SighashCache};
use bitcoin::transaction::Version;
use bitcoin::{
    Address, Amount, CompressedPublicKey, Network, OutPoint, ScriptBuf, Sequence, Transaction,
    TxIn, TxOut, Txid, Witness,
};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Mutex;

use crate::bitcoind::{faucet_secret_key, BitcoinRpc, Chain};

/// Fee paid by every faucet transaction (one input, two outputs: about 141 vB).
pub const FAUCET_FEE: Amount = Amount::from_sat(5_000);
/// Change below this is added to the fee instead.
const DUST: Amount = Amount::from_sat(1_000);
/// Confirmations a coinbase needs before it can be spent.
const COINBASE_MATURITY: u64 = 100;

/// P2WPKH address of a secret key.
pub fn p2wpkh_address(key: &SecretKey, network: Network) -> Address {
    let secp = Secp256k1::signing_only();
    let pk = CompressedPublicKey(key.public_key(&secp));
    Address::p2wpkh(&pk, network)
}

/// A payment the faucet made.
#[derive(Debug, Clone)]
pub struct FaucetPayment {
    /// The transaction.
    pub txid: Txid,
    /// Output index paying the recipient.
    pub vout: u32,
    /// Amount paid.
    pub amount: Amount,
}

#[derive(Debug, Clone)]
struct Coin {
    outpoint: OutPoint,
    value: Amount,
}

#[derive(Debug, Default)]
struct Ledger {
    /// Inputs of our transactions not yet known to be confirmed.
    spent: HashSet<OutPoint>,
    /// Change outputs of our unconfirmed transactions (spendable in a chain).
    change: Vec<Coin>,
}

/// The harness faucet for one chain.
#[derive(Debug)]
pub struct Faucet {
    key: SecretKey,
    address: Address,
    ledger: Mutex<Ledger>,
}

#[derive(Deserialize)]
struct ScanResult {
    success: bool,
    unspents: Vec<ScanUnspent>,
}

#[derive(Deserialize)]
struct ScanUnspent {
    txid: String,
    vout: u32,
    amount: f64,
    coinbase: bool,
    height: u64,
}

impl Faucet {
    /// The faucet of `chain` (the key the cached chains were mined to).
    pub fn new(chain: Chain) -> Self {
        let key = faucet_secret_key();
        let address = p2wpkh_address(&key, chain.network());
        Self {
            key,
            address,
            ledger: Mutex::new(Ledger::default()),
        }
    }

    /// Where the faucet's coins are.
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// Pay `amount` to `to`; returns once bitcoind accepted the transaction into its mempool.
    pub async fn send(
        &self,
        rpc: &BitcoinRpc,
        to: &Address,
        amount: Amount,
    ) -> anyhow::Result<FaucetPayment> {
        let mut ledger = self.ledger.lock().await;
        let coin = self
            .pick_coin(rpc, &mut ledger, amount + FAUCET_FEE)
            .await?;
        let own_script = self.address.script_pubkey();
        let mut outputs = vec![TxOut {
            value: amount,
            script_pubkey: to.script_pubkey(),
        }];
        let change = coin.value - amount - FAUCET_FEE;
        if change >= DUST {
            outputs.push(TxOut {
                value: change,
                script_pubkey: own_script.clone(),
            });
        }
        let mut tx = Transaction {
            version: Version::TWO,
            lock_time: LockTime::ZERO,
            input: vec![TxIn {
                previous_output: coin.outpoint,
                script_sig: ScriptBuf::new(),
                sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
                witness: Witness::new(),
            }],
            output: outputs,
        };
        self.sign(&mut tx, &own_script, coin.value)?;
        let txid: Txid = rpc
            .call("sendrawtransaction", &[json!(serialize_hex(&tx))])
            .await
            .with_context(|| format!("faucet spend of {} was refused", coin.outpoint))?;
        ledger.spent.insert(coin.outpoint);
        if change >= DUST {
            ledger.change.push(Coin {
                outpoint: OutPoint { txid, vout: 1 },
                value: change,
            });
        }
        Ok(FaucetPayment {
            txid,
            vout: 0,
            amount,
        })
    }

    fn sign(
        &self,
        tx: &mut Transaction,
        own_script: &ScriptBuf,
        value: Amount,
    ) -> anyhow::Result<()> {
        self.sign_input(tx, 0, own_script, value)
    }

    /// Sign input `index` of `tx`, which spends `value` from the faucet's address (P2WPKH).
    pub fn sign_input(
        &self,
        tx: &mut Transaction,
        index: usize,
        own_script: &ScriptBuf,
        value: Amount,
    ) -> anyhow::Result<()> {
        let secp = Secp256k1::signing_only();
        let sighash = SighashCache::new(&*tx)
            .p2wpkh_signature_hash(index, own_script, value, EcdsaSighashType::All)
            .context("cannot compute the sighash")?;
        let msg = Message::from_digest(sighash.to_byte_array());
        let signature = bitcoin::ecdsa::Signature::sighash_all(secp.sign_ecdsa(&msg, &self.key));
        let pk = CompressedPublicKey(self.key.public_key(&secp));
        tx.input[index].witness = Witness::p2wpkh(&signature, &pk.0);
        Ok(())
    }

    /// Take a spendable coin of at least `need` for a transaction the caller builds and signs
    /// with [`sign_input`](Self::sign_input) (it is marked spent).
    pub async fn take_coin(
        &self,
        rpc: &BitcoinRpc,
        need: Amount,
    ) -> anyhow::Result<(OutPoint, Amount)> {
        let mut ledger = self.ledger.lock().await;
        let coin = self.pick_coin(rpc, &mut ledger, need).await?;
        ledger.spent.insert(coin.outpoint);
        Ok((coin.outpoint, coin.value))
    }

    /// The smallest spendable coin worth at least `need`: a confirmed one (mature if a
    /// coinbase, not spent in the mempool), else change of our own unconfirmed transactions.
    async fn pick_coin(
        &self,
        rpc: &BitcoinRpc,
        ledger: &mut Ledger,
        need: Amount,
    ) -> anyhow::Result<Coin> {
        let tip: u64 = rpc.call("getblockcount", &[]).await?;
        let descriptor = format!("addr({})", self.address);
        let scan: ScanResult = rpc
            .call("scantxoutset", &[json!("start"), json!([descriptor])])
            .await?;
        anyhow::ensure!(scan.success, "scantxoutset did not complete");
        let confirmed: HashSet<OutPoint> = scan
            .unspents
            .iter()
            .filter_map(|u| {
                Txid::from_str(&u.txid)
                    .ok()
                    .map(|txid| OutPoint { txid, vout: u.vout })
            })
            .collect();
        // Forget change that confirmed (scantxoutset lists it now) and spends that confirmed.
        ledger
            .change
            .retain(|c| !confirmed.contains(&c.outpoint) && !ledger.spent.contains(&c.outpoint));
        let mut candidates: Vec<Coin> = Vec::new();
        for u in &scan.unspents {
            if u.coinbase && u.height + COINBASE_MATURITY > tip + 1 {
                continue;
            }
            let value = Amount::from_sat((u.amount * 1e8).round() as u64);
            let txid = Txid::from_str(&u.txid)?;
            let outpoint = OutPoint { txid, vout: u.vout };
            if value >= need && !ledger.spent.contains(&outpoint) {
                candidates.push(Coin { outpoint, value });
            }
        }
        candidates.sort_by_key(|c| c.value);
        for coin in candidates {
            // Not spent by a mempool transaction (ours from an earlier run, or anyone's).
            let out: serde_json::Value = rpc
                .call(
                    "gettxout",
                    &[
                        json!(coin.outpoint.txid.to_string()),
                        json!(coin.outpoint.vout),
                        json!(true),
                    ],
                )
                .await?;
            if !out.is_null() {
                return Ok(coin);
            }
            ledger.spent.insert(coin.outpoint);
        }
        if let Some(i) = ledger.change.iter().position(|c| c.value >= need) {
            return Ok(ledger.change.remove(i));
        }
        Err(anyhow!(
            "the faucet ({}) has no spendable coin of at least {need} at height {tip}: mine blocks \
             (mature coinbases) or confirm earlier faucet transactions",
            self.address
        ))
    }
}
