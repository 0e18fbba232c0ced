//! Records the pool side appends to Redis streams. Every record carries `v` (schema version);
//! readers refuse versions they do not know rather than guess. Field values are strings.

use std::collections::HashMap;

use crate::tlv::LockingPubkey;

/// Schema version of [`ShareRecord`] (2: the header fields `version`, `nonce` and the full
/// `extranonce` were added, so anyone holding the template's audit task can rebuild the
/// share's header and check its hash; `template_id` carries the pool epoch).
pub const SHARE_RECORD_VERSION: u32 = 2;
/// Schema version of [`AuditTask`] (2: `payout_sats` was added).
pub const AUDIT_TASK_VERSION: u32 = 2;
/// Schema version of [`AuditResult`].
pub const AUDIT_RESULT_VERSION: u32 = 1;

/// A record could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// A field is absent.
    #[error("record has no field `{0}`")]
    Missing(&'static str),
    /// A field does not parse.
    #[error("record field `{field}` is invalid: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A schema version this code does not know.
    #[error("record version {found} is not supported (this reader knows {known})")]
    Version {
        /// In the record.
        found: String,
        /// What we read.
        known: u32,
    },
}

/// `ehash:shares`: one accepted share of a channel that has a locking key. Written before the
/// pool acknowledges the share, at most once per share hash for the life of the pool.
///
/// The share's block is the template's audit-task block with the coinbase's trailing
/// extranonce bytes replaced by `extranonce` and the header's version, time and nonce by
/// `version`, `ntime` and `nonce`; its header hash is `share_hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareRecord {
    /// Block header hash, hex, in display order (as block explorers print hashes).
    pub share_hash: String,
    /// Template the share's job was built from: unique for the life of the pool (see
    /// [`crate::template_id`]).
    pub template_id: u64,
    /// SV2 channel.
    pub channel_id: u32,
    /// Operator's key the mint locks the quote to.
    pub locking_pubkey: LockingPubkey,
    /// ehash amount (see [`crate::amount`]).
    pub amount: u64,
    /// Header timestamp of the share.
    pub ntime: u32,
    /// Header version of the share (after version rolling).
    pub version: u32,
    /// Header nonce of the share.
    pub nonce: u32,
    /// The coinbase's whole extranonce (channel prefix + the miner's rolled part), hex.
    pub extranonce: String,
}

/// Whose template an audit task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateKind {
    /// Built by the pool from its bitcoind.
    Pool,
    /// Declared by a miner (custom job).
    Declared,
}

impl TemplateKind {
    /// Its name in records.
    pub fn as_str(self) -> &'static str {
        match self {
            TemplateKind::Pool => "pool",
            TemplateKind::Declared => "declared",
        }
    }
}

/// `audit:tasks`: a template that got its first share, as a full block without valid proof
/// of work, for the auditor to check with `getblocktemplate` proposal mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditTask {
    /// Template id.
    pub template_id: u64,
    /// Pool or miner-declared.
    pub kind: TemplateKind,
    /// Hash of the block it builds on (display order).
    pub prev_hash: String,
    /// Height of the block.
    pub height: u64,
    /// The whole block (header, coinbase with its witness, transactions), hex.
    pub block: String,
    /// Output script the pool requires in the coinbase, hex.
    pub payout_script: String,
    /// What the coinbase must pay to `payout_script` at least, satoshis.
    pub payout_sats: u64,
}

/// An auditor's verdict on a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Bitcoin Core accepts the block (proof of work aside) and the pool policy holds: its
    /// quotes are paid.
    Valid,
    /// Refused: its quotes are never paid.
    Invalid,
}

impl Verdict {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Valid => "valid",
            Verdict::Invalid => "invalid",
        }
    }
}

/// `audit:results`: the verdict on one template (and, for an invalid one, `audit:dead` holds
/// the task with the same reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditResult {
    /// Template id.
    pub template_id: u64,
    /// The verdict.
    pub verdict: Verdict,
    /// Bitcoin Core's reject string or the policy rule; for a valid template how it was
    /// checked (`proposal` or `in-chain`).
    pub reason: String,
    /// Unix time (ms) of the audit.
    pub audited_at: u64,
}

impl AuditResult {
    /// Stream fields in a fixed order.
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("v", AUDIT_RESULT_VERSION.to_string()),
            ("template_id", self.template_id.to_string()),
            ("verdict", self.verdict.as_str().to_string()),
            ("reason", self.reason.clone()),
            ("audited_at", self.audited_at.to_string()),
        ]
    }

    /// Read a stream entry.
    pub fn from_fields(f: &HashMap<String, String>) -> Result<Self, RecordError> {
        check_version(f, AUDIT_RESULT_VERSION)?;
        let verdict = match get(f, "verdict")? {
            "valid" => Verdict::Valid,
            "invalid" => Verdict::Invalid,
            other => {
                return Err(RecordError::Invalid {
                    field: "verdict",
                    reason: format!("{other:?}"),
                })
            }
        };
        Ok(Self {
            template_id: parse(f, "template_id")?,
            verdict,
            reason: get(f, "reason")?.to_string(),
            audited_at: parse(f, "audited_at")?,
        })
    }
}

fn get<'a>(f: &'a HashMap<String, String>, k: &'static str) -> Result<&'a str, RecordError> {
    f.get(k).map(String::as_str).ok_or(RecordError::Missing(k))
}

fn parse<T: std::str::FromStr>(
    f: &HashMap<String, String>,
    k: &'static str,
) -> Result<T, RecordError>
where
    T::Err: std::fmt::Display,
{
    get(f, k)?
        .parse()
        .map_err(|e: T::Err| RecordError::Invalid {
            field: k,
            reason: e.to_string(),
        })
}

fn check_version(f: &HashMap<String, String>, known: u32) -> Result<(), RecordError> {
    let v = get(f, "v")?;
    if v != known.to_string() {
        return Err(RecordError::Version {
            found: v.to_string(),
            known,
        });
    }
    Ok(())
}

fn hex_field(
    f: &HashMap<String, String>,
    k: &'static str,
    len: Option<usize>,
) -> Result<String, RecordError> {
    let s = get(f, k)?;
    let bytes = hex::decode(s).map_err(|e| RecordError::Invalid {
        field: k,
        reason: e.to_string(),
    })?;
    if let Some(len) = len {
        if bytes.len() != len {
            return Err(RecordError::Invalid {
                field: k,
                reason: format!("{} bytes, expected {len}", bytes.len()),
            });
        }
    }
    // One spelling per value: keys derived from it (quotes by share hash) must not depend on
    // the case a writer chose.
    Ok(s.to_ascii_lowercase())
}

/// A field value borrowed from a record, for writers that encode it themselves (the pool
/// writes records on its share path and avoids allocating a string per field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldRef<'a> {
    /// Text as is.
    Str(&'a str),
    /// A decimal integer.
    Int(u64),
    /// Bytes written as lower-case hex.
    Hex(&'a [u8]),
}

impl std::fmt::Display for FieldRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FieldRef::Str(s) => f.write_str(s),
            FieldRef::Int(n) => write!(f, "{n}"),
            FieldRef::Hex(b) => f.write_str(&hex::encode(b)),
        }
    }
}

impl ShareRecord {
    /// Stream fields in a fixed order, borrowed.
    pub fn field_refs(&self) -> [(&'static str, FieldRef<'_>); 10] {
        [
            ("v", FieldRef::Int(u64::from(SHARE_RECORD_VERSION))),
            ("share_hash", FieldRef::Str(&self.share_hash)),
            ("template_id", FieldRef::Int(self.template_id)),
            ("channel_id", FieldRef::Int(u64::from(self.channel_id))),
            (
                "locking_pubkey",
                FieldRef::Hex(self.locking_pubkey.as_bytes()),
            ),
            ("amount", FieldRef::Int(self.amount)),
            ("ntime", FieldRef::Int(u64::from(self.ntime))),
            ("version", FieldRef::Int(u64::from(self.version))),
            ("nonce", FieldRef::Int(u64::from(self.nonce))),
            ("extranonce", FieldRef::Str(&self.extranonce)),
        ]
    }

    /// Stream fields in a fixed order.
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        self.field_refs()
            .iter()
            .map(|(k, v)| (*k, v.to_string()))
            .collect()
    }

    /// Read a stream entry.
    pub fn from_fields(f: &HashMap<String, String>) -> Result<Self, RecordError> {
        check_version(f, SHARE_RECORD_VERSION)?;
        Ok(Self {
            share_hash: hex_field(f, "share_hash", Some(32))?,
            template_id: parse(f, "template_id")?,
            channel_id: parse(f, "channel_id")?,
            locking_pubkey: parse(f, "locking_pubkey")?,
            amount: match parse::<u64>(f, "amount")? {
                a if a.is_power_of_two() => a,
                a => {
                    return Err(RecordError::Invalid {
                        field: "amount",
                        reason: format!("{a} is not a power of two (2^(zero bits - min_bits))"),
                    })
                }
            },
            ntime: parse(f, "ntime")?,
            version: parse(f, "version")?,
            nonce: parse(f, "nonce")?,
            extranonce: hex_field(f, "extranonce", None)?,
        })
    }
}

impl AuditTask {
    /// Stream fields in a fixed order.
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("v", AUDIT_TASK_VERSION.to_string()),
            ("template_id", self.template_id.to_string()),
            ("kind", self.kind.as_str().to_string()),
            ("prev_hash", self.prev_hash.clone()),
            ("height", self.height.to_string()),
            ("block", self.block.clone()),
            ("payout_script", self.payout_script.clone()),
            ("payout_sats", self.payout_sats.to_string()),
        ]
    }

    /// Read a stream entry.
    pub fn from_fields(f: &HashMap<String, String>) -> Result<Self, RecordError> {
        check_version(f, AUDIT_TASK_VERSION)?;
        let kind = match get(f, "kind")? {
            "pool" => TemplateKind::Pool,
            "declared" => TemplateKind::Declared,
            other => {
                return Err(RecordError::Invalid {
                    field: "kind",
                    reason: format!("{other:?}"),
                })
            }
        };
        Ok(Self {
            template_id: parse(f, "template_id")?,
            kind,
            prev_hash: hex_field(f, "prev_hash", Some(32))?,
            height: parse(f, "height")?,
            block: hex_field(f, "block", None)?,
            payout_script: hex_field(f, "payout_script", None)?,
            payout_sats: parse(f, "payout_sats")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share() -> ShareRecord {
        ShareRecord {
            share_hash: format!("0000000{}", "ab".repeat(28)) + "c",
            template_id: 7,
            channel_id: 3,
            locking_pubkey: "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"
                .parse()
                .unwrap(),
            amount: 16,
            ntime: 1_790_000_000,
            version: 0x2000_4000,
            nonce: 0xdead_beef,
            extranonce: "4850000100000000000000000000000000000007".into(),
        }
    }

    fn map(fields: &[(&'static str, String)]) -> HashMap<String, String> {
        fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn share_record_format_is_pinned_and_round_trips() {
        let r = share();
        let fields = r.to_fields();
        insta::with_settings!({snapshot_path => "../../../fixtures/snapshots"}, {
            insta::assert_yaml_snapshot!("ehash_shares_record_v2", fields);
        });
        assert_eq!(ShareRecord::from_fields(&map(&fields)).unwrap(), r);
    }

    #[test]
    fn audit_task_format_is_pinned_and_round_trips() {
        let t = AuditTask {
            template_id: 7,
            kind: TemplateKind::Pool,
            prev_hash: "00".repeat(32),
            height: 111,
            block: "0100".into(),
            payout_script: "0014".to_string() + &"11".repeat(20),
            payout_sats: 5_000_000_000,
        };
        let fields = t.to_fields();
        insta::with_settings!({snapshot_path => "../../../fixtures/snapshots"}, {
            insta::assert_yaml_snapshot!("audit_tasks_record_v2", fields);
        });
        assert_eq!(AuditTask::from_fields(&map(&fields)).unwrap(), t);
    }

    #[test]
    fn audit_result_format_is_pinned_and_round_trips() {
        let r = AuditResult {
            template_id: 7,
            verdict: Verdict::Invalid,
            reason: "bad-txns-inputs-missingorspent".into(),
            audited_at: 1_795_000_000_123,
        };
        let fields = r.to_fields();
        insta::with_settings!({snapshot_path => "../../../fixtures/snapshots"}, {
            insta::assert_yaml_snapshot!("audit_results_record_v1", fields);
        });
        assert_eq!(AuditResult::from_fields(&map(&fields)).unwrap(), r);
    }

    #[test]
    fn readers_refuse_unknown_versions_and_bad_fields() {
        for old_or_new in ["1", "3"] {
            let mut f = map(&share().to_fields());
            f.insert("v".into(), old_or_new.into());
            assert!(matches!(
                ShareRecord::from_fields(&f),
                Err(RecordError::Version { .. })
            ));
        }
        let mut f = map(&share().to_fields());
        f.insert("amount".into(), "lots".into());
        assert!(matches!(
            ShareRecord::from_fields(&f),
            Err(RecordError::Invalid {
                field: "amount",
                ..
            })
        ));
        let mut f = map(&share().to_fields());
        f.insert("amount".into(), "0".into());
        assert!(matches!(
            ShareRecord::from_fields(&f),
            Err(RecordError::Invalid {
                field: "amount",
                ..
            })
        ));
        let mut f = map(&share().to_fields());
        let upper = share().share_hash.to_ascii_uppercase();
        f.insert("share_hash".into(), upper);
        assert_eq!(
            ShareRecord::from_fields(&f).unwrap().share_hash,
            share().share_hash
        );
        let mut f = map(&share().to_fields());
        f.remove("ntime");
        assert_eq!(
            ShareRecord::from_fields(&f),
            Err(RecordError::Missing("ntime"))
        );
    }
}
