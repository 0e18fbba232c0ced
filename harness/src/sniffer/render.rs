//! Recorded SV2 flows as stable, readable text for insta snapshots.
//!
//! A flow is picked out of the record by matching (a request and its answer, a job and the
//! `SetNewPrevHash` that activates it), so frames of other flows interleaved on the wire do not
//! enter it, and rendered in the order the sniffer read its frames. Values that differ from run to run are replaced: ids by the order they first
//! appear in the flow (`channel#1`, `job#2`, so equal ids stay visibly equal), hashes, nonces,
//! times and byte strings by a placeholder with their length. What a protocol change would
//! move stays: message types and their order, directions, versions, flags, sizes, extension
//! types, TLVs, error codes, targets as leading zero bits.

use std::collections::HashMap;
use std::fmt::Write;

use stratum_apps::stratum_core::common_messages_sv2::Protocol;
use stratum_apps::stratum_core::parsers_sv2::{
    AnyMessageOwned, CommonMessagesOwned, ExtensionsNegotiationOwned, ExtensionsOwned, MiningOwned,
};

use super::{Captured, Direction};

/// Ids renamed by first appearance.
#[derive(Default)]
struct Names {
    by_kind: HashMap<(&'static str, u32), usize>,
    counts: HashMap<&'static str, usize>,
}

impl Names {
    fn name(&mut self, kind: &'static str, id: u32) -> String {
        let n = match self.by_kind.get(&(kind, id)) {
            Some(n) => *n,
            None => {
                let c = self.counts.entry(kind).or_default();
                *c += 1;
                self.by_kind.insert((kind, id), *c);
                *c
            }
        };
        format!("{kind}#{n}")
    }
}

/// Leading zero bits of a 256-bit little-endian target.
fn zero_bits(le: &[u8]) -> u32 {
    let mut bits = 0;
    for b in le.iter().rev() {
        if *b == 0 {
            bits += 8;
        } else {
            bits += b.leading_zeros();
            break;
        }
    }
    bits
}

/// Extension types as `[0x4841, ...]`.
fn hex_list(types: &[u16]) -> String {
    let items: Vec<String> = types.iter().map(|t| format!("{t:#06x}")).collect();
    format!("[{}]", items.join(", "))
}

/// A name with its trailing number (a per-process counter) replaced: `proxy-miner-<n>`.
fn numbered(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let stem = s.trim_end_matches(|c: char| c.is_ascii_digit());
    if stem.len() < s.len() {
        format!("{:?}", format!("{stem}<n>"))
    } else {
        format!("{s:?}")
    }
}

fn bytes(n: usize) -> String {
    format!("<{n} bytes>")
}

/// Render `flow` as one line per frame.
pub fn render(flow: &[&Captured]) -> String {
    let mut names = Names::default();
    let mut out = String::new();
    for c in flow {
        let arrow = match c.direction {
            Direction::ToPool => "proxy -> pool",
            Direction::ToClient => "pool -> proxy",
        };
        let body = match &c.message {
            Some(m) => message(m, &mut names),
            None => format!("<undecodable type {:#04x}>", c.msg_type),
        };
        let _ = write!(out, "{arrow}  {body}");
        for (ext, field, len) in &c.tlvs {
            let _ = write!(
                out,
                " + TLV {{ extension: {ext:#06x}, field: {field:#04x}, length: {len} }}"
            );
        }
        if !c.forwarded {
            out.push_str("  [held back by the sniffer]");
        }
        out.push('\n');
    }
    out
}

fn message(m: &AnyMessageOwned, n: &mut Names) -> String {
    let s = |b: &[u8]| format!("{:?}", String::from_utf8_lossy(b));
    match m {
        AnyMessageOwned::Common(c) => match c {
            CommonMessagesOwned::SetupConnection(m) => format!(
                "SetupConnection {{ protocol: {}, min_version: {}, max_version: {}, flags: {:#b}, endpoint: <host:port>, vendor: {}, hardware_version: {}, firmware: <version>, device_id: {} }}",
                match m.protocol { Protocol::MiningProtocol => "Mining", Protocol::JobDeclarationProtocol => "JobDeclaration", Protocol::TemplateDistributionProtocol => "TemplateDistribution" },
                m.min_version, m.max_version, m.flags, s(m.vendor.as_bytes()), s(m.hardware_version.as_bytes()), numbered(m.device_id.as_bytes()),
            ),
            CommonMessagesOwned::SetupConnectionSuccess(m) => format!(
                "SetupConnectionSuccess {{ used_version: {}, flags: {:#b} }}",
                m.used_version, m.flags
            ),
            CommonMessagesOwned::SetupConnectionError(m) => format!(
                "SetupConnectionError {{ flags: {:#b}, error_code: {} }}",
                m.flags,
                s(m.error_code.as_bytes())
            ),
            other => format!("{other:?}"),
        },
        AnyMessageOwned::Extensions(ExtensionsOwned::ExtensionsNegotiation(e)) => match e {
            ExtensionsNegotiationOwned::RequestExtensions(m) => format!(
                "RequestExtensions {{ request_id: {}, requested_extensions: {} }}",
                m.request_id,
                hex_list(&m.requested_extensions.clone().into_inner())
            ),
            ExtensionsNegotiationOwned::RequestExtensionsSuccess(m) => format!(
                "RequestExtensionsSuccess {{ request_id: {}, supported_extensions: {} }}",
                m.request_id,
                hex_list(&m.supported_extensions.clone().into_inner())
            ),
            ExtensionsNegotiationOwned::RequestExtensionsError(m) => format!(
                "RequestExtensionsError {{ request_id: {}, unsupported_extensions: {}, required_extensions: {} }}",
                m.request_id,
                hex_list(&m.unsupported_extensions.clone().into_inner()),
                hex_list(&m.required_extensions.clone().into_inner())
            ),
        },
        AnyMessageOwned::Mining(m) => mining(m, n),
        other => format!("{other:?}"),
    }
}

fn mining(m: &MiningOwned, n: &mut Names) -> String {
    let s = |b: &[u8]| format!("{:?}", String::from_utf8_lossy(b));
    match m {
        MiningOwned::OpenExtendedMiningChannel(m) => format!(
            "OpenExtendedMiningChannel {{ request_id: {}, user_identity: {}, nominal_hash_rate: {}, max_target: <{} zero bits>, min_extranonce_size: {} }}",
            m.request_id, numbered(m.user_identity.as_bytes()), m.nominal_hash_rate, zero_bits(m.max_target.as_ref()), m.min_extranonce_size
        ),
        MiningOwned::OpenExtendedMiningChannelSuccess(m) => format!(
            "OpenExtendedMiningChannelSuccess {{ request_id: {}, channel_id: {}, target: <{} zero bits>, extranonce_size: {}, extranonce_prefix: {}, group_channel_id: {} }}",
            m.request_id, n.name("channel", m.channel_id), zero_bits(m.target.as_ref()), m.extranonce_size, bytes(m.extranonce_prefix.as_ref().len()), m.group_channel_id
        ),
        MiningOwned::OpenMiningChannelError(m) => format!(
            "OpenMiningChannelError {{ request_id: {}, error_code: {} }}",
            m.request_id, s(m.error_code.as_bytes())
        ),
        MiningOwned::NewExtendedMiningJob(m) => format!(
            "NewExtendedMiningJob {{ channel_id: {}, job_id: {}, min_ntime: {}, version: {:#010x}, version_rolling_allowed: {}, merkle_path: <{} hashes>, coinbase_tx_prefix: {}, coinbase_tx_suffix: {} }}",
            n.name("channel", m.channel_id), n.name("job", m.job_id),
            if m.min_ntime.clone().into_inner().is_some() { "<time>" } else { "none (future job)" },
            m.version, m.version_rolling_allowed, m.merkle_path.clone().into_inner().len(),
            bytes(m.coinbase_tx_prefix.as_ref().len()), bytes(m.coinbase_tx_suffix.as_ref().len())
        ),
        MiningOwned::SetNewPrevHash(m) => format!(
            "SetNewPrevHash {{ channel_id: {}, job_id: {}, prev_hash: <block hash>, min_ntime: <time>, nbits: {:#010x} }}",
            n.name("channel", m.channel_id), n.name("job", m.job_id), m.nbits
        ),
        MiningOwned::SetTarget(m) => format!(
            "SetTarget {{ channel_id: {}, maximum_target: <{} zero bits> }}",
            n.name("channel", m.channel_id), zero_bits(m.maximum_target.as_ref())
        ),
        MiningOwned::SubmitSharesExtended(m) => format!(
            "SubmitSharesExtended {{ channel_id: {}, sequence_number: {}, job_id: {}, nonce: <nonce>, ntime: <time>, version: <rolled version>, extranonce: {} }}",
            n.name("channel", m.channel_id), n.name("seq", m.sequence_number), n.name("job", m.job_id), bytes(m.extranonce.as_ref().len())
        ),
        MiningOwned::SubmitSharesSuccess(m) => format!(
            "SubmitSharesSuccess {{ channel_id: {}, last_sequence_number: {}, new_submits_accepted_count: {}, new_shares_sum: <work> }}",
            n.name("channel", m.channel_id), n.name("seq", m.last_sequence_number), m.new_submits_accepted_count
        ),
        MiningOwned::SubmitSharesError(m) => format!(
            "SubmitSharesError {{ channel_id: {}, sequence_number: {}, error_code: {} }}",
            n.name("channel", m.channel_id), n.name("seq", m.sequence_number), s(m.error_code.as_bytes())
        ),
        MiningOwned::CloseChannel(m) => format!(
            "CloseChannel {{ channel_id: {}, reason_code: {} }}",
            n.name("channel", m.channel_id), s(m.reason_code.as_bytes())
        ),
        other => format!("{other:?}"),
    }
}

fn mining_of(c: &Captured) -> Option<&MiningOwned> {
    match &c.message {
        Some(AnyMessageOwned::Mining(m)) => Some(m),
        _ => None,
    }
}

/// `flow` in the order the sniffer read its frames (flows are picked by matching; this puts
/// them back in wire order, so a reordering on the wire changes the snapshot).
fn in_wire_order<'a>(log: &'a [Captured], mut flow: Vec<&'a Captured>) -> Vec<&'a Captured> {
    flow.sort_by_key(|c| log.iter().position(|x| std::ptr::eq(x, *c)));
    flow
}

/// `SetupConnection`, `RequestExtensions` and the pool's answer to each, on connection `conn`.
/// `None` until all four were seen.
pub fn extension_negotiation(log: &[Captured], conn: u64) -> Option<Vec<&Captured>> {
    let first = |want: fn(&AnyMessageOwned) -> bool, dir: Direction| {
        log.iter()
            .find(|c| c.conn == conn && c.direction == dir && c.message.as_ref().is_some_and(want))
    };
    let flow = vec![
        first(
            |m| {
                matches!(
                    m,
                    AnyMessageOwned::Common(CommonMessagesOwned::SetupConnection(_))
                )
            },
            Direction::ToPool,
        )?,
        first(
            |m| {
                matches!(
                    m,
                    AnyMessageOwned::Common(
                        CommonMessagesOwned::SetupConnectionSuccess(_)
                            | CommonMessagesOwned::SetupConnectionError(_)
                    )
                )
            },
            Direction::ToClient,
        )?,
        first(
            |m| {
                matches!(
                    m,
                    AnyMessageOwned::Extensions(ExtensionsOwned::ExtensionsNegotiation(
                        ExtensionsNegotiationOwned::RequestExtensions(_)
                    ))
                )
            },
            Direction::ToPool,
        )?,
        first(
            |m| matches!(m, AnyMessageOwned::Extensions(_)),
            Direction::ToClient,
        )?,
    ];
    Some(in_wire_order(log, flow))
}

/// The first channel opened on `conn`: the request, its answer, the first job on the channel
/// and the `SetNewPrevHash` that activates it. `None` until all four were seen.
pub fn channel_open(log: &[Captured], conn: u64) -> Option<Vec<&Captured>> {
    let on = |c: &&Captured| c.conn == conn;
    let (i, open) = log
        .iter()
        .enumerate()
        .filter(|(_, c)| on(c))
        .find(|(_, c)| {
            matches!(
                mining_of(c),
                Some(MiningOwned::OpenExtendedMiningChannel(_))
            )
        })?;
    let Some(MiningOwned::OpenExtendedMiningChannel(req)) = mining_of(open) else {
        return None;
    };
    let (j, success) = log.iter().enumerate().skip(i).filter(|(_, c)| on(c)).find(|(_, c)| {
        matches!(mining_of(c), Some(MiningOwned::OpenExtendedMiningChannelSuccess(s)) if s.request_id == req.request_id)
    })?;
    let Some(MiningOwned::OpenExtendedMiningChannelSuccess(s)) = mining_of(success) else {
        return None;
    };
    let prev = log.iter().skip(j).filter(on).find(|c| {
        matches!(mining_of(c), Some(MiningOwned::SetNewPrevHash(p)) if p.channel_id == s.channel_id)
    })?;
    let Some(MiningOwned::SetNewPrevHash(p)) = mining_of(prev) else {
        return None;
    };
    let job = job_on(log, conn, s.channel_id, p.job_id)?;
    Some(in_wire_order(log, vec![open, success, job, prev]))
}

fn job_on(log: &[Captured], conn: u64, channel: u32, job: u32) -> Option<&Captured> {
    log.iter().filter(|c| c.conn == conn).find(|c| {
        matches!(mining_of(c), Some(MiningOwned::NewExtendedMiningJob(j)) if j.channel_id == channel && j.job_id == job)
    })
}

/// A share picked by `pick` and the pool's answer to it. `None` until both were seen.
pub fn share(log: &[Captured], pick: impl Fn(u32, u32) -> bool) -> Option<Vec<&Captured>> {
    let (i, sent) = log.iter().enumerate().find(|(_, c)| {
        c.direction == Direction::ToPool
            && matches!(mining_of(c), Some(MiningOwned::SubmitSharesExtended(s)) if pick(s.nonce, s.ntime))
    })?;
    let Some(MiningOwned::SubmitSharesExtended(s)) = mining_of(sent) else {
        return None;
    };
    let answer = log
        .iter()
        .skip(i)
        .filter(|c| c.conn == sent.conn)
        .find(|c| match mining_of(c) {
            Some(MiningOwned::SubmitSharesSuccess(a)) => {
                a.channel_id == s.channel_id && a.last_sequence_number == s.sequence_number
            }
            Some(MiningOwned::SubmitSharesError(e)) => {
                e.channel_id == s.channel_id && e.sequence_number == s.sequence_number
            }
            _ => false,
        })?;
    Some(vec![sent, answer])
}

/// Every share sent to the pool that has an answer, as (share, answer), in send order.
fn answered_shares(log: &[Captured]) -> impl Iterator<Item = Vec<&Captured>> {
    log.iter()
        .filter(|c| c.direction == Direction::ToPool)
        .filter_map(|c| match mining_of(c) {
            Some(MiningOwned::SubmitSharesExtended(s)) => Some((s.nonce, s.ntime)),
            _ => None,
        })
        .filter_map(move |(nonce, ntime)| share(log, |n, t| n == nonce && t == ntime))
}

/// Whether some share's answer was read at least `gap` after the share itself.
pub fn delayed_answer(log: &[Captured], gap: std::time::Duration) -> bool {
    answered_shares(log).any(|f| f[1].at.duration_since(f[0].at) >= gap)
}

/// The first share the pool accepted, and its answer.
pub fn first_accepted_share(log: &[Captured]) -> Option<Vec<&Captured>> {
    answered_shares(log)
        .find(|f| matches!(mining_of(f[1]), Some(MiningOwned::SubmitSharesSuccess(_))))
}

/// The share that became block `nonce`/`ntime` (the header as Bitcoin Core stored it), the
/// pool's answer, and the new tip's job and `SetNewPrevHash` (its `prev_hash` is the block,
/// internal byte order) on the same channel.
pub fn block_found(
    log: &[Captured],
    nonce: u32,
    ntime: u32,
    block_hash: [u8; 32],
) -> Option<Vec<&Captured>> {
    let mut flow = share(log, |n, t| n == nonce && t == ntime)?;
    let Some(MiningOwned::SubmitSharesExtended(s)) = mining_of(flow[0]) else {
        return None;
    };
    let conn = flow[0].conn;
    let prev = log.iter().filter(|c| c.conn == conn).find(|c| {
        matches!(mining_of(c), Some(MiningOwned::SetNewPrevHash(p))
            if p.channel_id == s.channel_id && p.prev_hash.as_ref() == block_hash.as_slice())
    })?;
    let Some(MiningOwned::SetNewPrevHash(p)) = mining_of(prev) else {
        return None;
    };
    flow.push(job_on(log, conn, s.channel_id, p.job_id)?);
    flow.push(prev);
    Some(in_wire_order(log, flow))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_bits_of_little_endian_targets() {
        let mut t = [0xffu8; 32];
        assert_eq!(zero_bits(&t), 0);
        t[31] = 0;
        t[30] = 0x0f;
        assert_eq!(zero_bits(&t), 12);
        assert_eq!(zero_bits(&[0u8; 32]), 256);
    }

    #[test]
    fn ids_are_named_by_first_appearance() {
        let mut n = Names::default();
        assert_eq!(n.name("job", 77), "job#1");
        assert_eq!(n.name("job", 5), "job#2");
        assert_eq!(n.name("job", 77), "job#1");
        assert_eq!(n.name("channel", 5), "channel#1");
    }

    #[test]
    fn counters_in_names_are_masked() {
        assert_eq!(numbered(b"proxy-miner-12"), "\"proxy-miner-<n>\"");
        assert_eq!(numbered(b"alice"), "\"alice\"");
        assert_eq!(hex_list(&[0x4841, 2]), "[0x4841, 0x0002]");
    }
}
