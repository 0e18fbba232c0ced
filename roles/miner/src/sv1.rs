//! The SV1 (JSON lines) messages a CPU miner exchanges with its proxy.

use serde_json::{json, Value};

use crate::work::Job;

/// The version-rolling mask the miner asks for (BIP320).
pub const VERSION_ROLLING_MASK: u32 = 0x1fff_e000;

/// A line from the proxy.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// Answer to one of our requests.
    Response {
        /// Our request id.
        id: u64,
        /// `result` (null on error).
        result: Value,
        /// `error` (null on success): usually `[code, message, data]`.
        error: Value,
    },
    /// `mining.notify`.
    Notify(Job),
    /// `mining.set_difficulty`.
    SetDifficulty(f64),
    /// `mining.set_version_mask`.
    SetVersionMask(u32),
    /// `mining.set_extranonce`: new extranonce1 and extranonce2 size.
    SetExtranonce(Vec<u8>, usize),
    /// A method we do not act on.
    Other(String),
}

fn hex32(v: &Value, what: &str) -> Result<u32, String> {
    let s = v
        .as_str()
        .ok_or_else(|| format!("{what} is not a string"))?;
    u32::from_str_radix(s, 16).map_err(|e| format!("{what} {s:?}: {e}"))
}

fn bytes(v: &Value, what: &str) -> Result<Vec<u8>, String> {
    let s = v
        .as_str()
        .ok_or_else(|| format!("{what} is not a string"))?;
    hex::decode(s).map_err(|e| format!("{what}: {e}"))
}

/// SV1's prevhash: the header's 32 bytes with every 4-byte word byte-swapped.
pub fn prev_hash_from_sv1(s: &[u8]) -> Result<[u8; 32], String> {
    let arr: [u8; 32] = s
        .try_into()
        .map_err(|_| format!("prevhash has {} bytes", s.len()))?;
    let mut out = [0u8; 32];
    for w in 0..8 {
        for b in 0..4 {
            out[w * 4 + b] = arr[w * 4 + 3 - b];
        }
    }
    Ok(out)
}

/// Parse one line.
pub fn parse(line: &str) -> Result<Inbound, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    if let Some(method) = v.get("method").and_then(Value::as_str) {
        let params = v.get("params").cloned().unwrap_or(Value::Null);
        return match method {
            "mining.notify" => parse_notify(&params).map(Inbound::Notify),
            "mining.set_difficulty" => params
                .get(0)
                .and_then(Value::as_f64)
                .map(Inbound::SetDifficulty)
                .ok_or_else(|| format!("bad set_difficulty {params}")),
            "mining.set_version_mask" => params
                .get(0)
                .ok_or_else(|| "set_version_mask without mask".to_string())
                .and_then(|m| hex32(m, "mask"))
                .map(Inbound::SetVersionMask),
            "mining.set_extranonce" => {
                let en1 = bytes(params.get(0).unwrap_or(&Value::Null), "extranonce1")?;
                let size = params
                    .get(1)
                    .and_then(Value::as_u64)
                    .ok_or("set_extranonce without size")? as usize;
                Ok(Inbound::SetExtranonce(en1, size))
            }
            other => Ok(Inbound::Other(other.to_string())),
        };
    }
    let id = v
        .get("id")
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("response without numeric id: {line}"))?;
    Ok(Inbound::Response {
        id,
        result: v.get("result").cloned().unwrap_or(Value::Null),
        error: v.get("error").cloned().unwrap_or(Value::Null),
    })
}

fn parse_notify(p: &Value) -> Result<Job, String> {
    let a = p
        .as_array()
        .filter(|a| a.len() >= 9)
        .ok_or_else(|| format!("notify needs 9 params: {p}"))?;
    let branch = a[4]
        .as_array()
        .ok_or("merkle branch is not an array")?
        .iter()
        .map(|b| {
            bytes(b, "branch")?
                .try_into()
                .map_err(|_| "branch entry is not 32 bytes".to_string())
        })
        .collect::<Result<Vec<[u8; 32]>, String>>()?;
    Ok(Job {
        job_id: a[0].as_str().ok_or("job id is not a string")?.to_string(),
        prev_hash: prev_hash_from_sv1(&bytes(&a[1], "prevhash")?)?,
        coinb1: bytes(&a[2], "coinb1")?,
        coinb2: bytes(&a[3], "coinb2")?,
        merkle_branch: branch,
        version: hex32(&a[5], "version")?,
        nbits: hex32(&a[6], "nbits")?,
        ntime: hex32(&a[7], "ntime")?,
        clean: a[8].as_bool().unwrap_or(false),
    })
}

/// A request with a numeric id rewritten with the id as the string `"sv1-N"`.
pub fn with_string_id(line: &str) -> String {
    match serde_json::from_str::<Value>(line) {
        Ok(mut v) => {
            if let Some(n) = v.get("id").and_then(Value::as_u64) {
                v["id"] = json!(format!("sv1-{n}"));
            }
            v.to_string()
        }
        Err(_) => line.to_string(),
    }
}

/// An answer to a request sent by [`with_string_id`], its id turned back into the number;
/// `Err` if its id is not such a string (not echoed as sent). Notifications pass unchanged.
pub fn from_string_id(line: &str) -> Result<String, String> {
    let Ok(mut v) = serde_json::from_str::<Value>(line) else {
        return Ok(line.to_string());
    };
    if v.get("method").is_some() {
        return Ok(line.to_string());
    }
    // Byte for byte: the raw JSON text of the id must be exactly the `"sv1-N"` sent.
    let raw = serde_json::from_str::<
        std::collections::HashMap<String, Box<serde_json::value::RawValue>>,
    >(line)
    .ok()
    .and_then(|m| m.get("id").map(|id| id.get().to_string()))
    .unwrap_or_default();
    let n = v
        .get("id")
        .and_then(Value::as_str)
        .and_then(|s| s.strip_prefix("sv1-"))
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|n| raw == format!("\"sv1-{n}\""))
        .ok_or_else(|| format!("answer id not echoed as the string sent: {line}"))?;
    v["id"] = json!(n);
    Ok(v.to_string())
}

/// `mining.configure` asking for version rolling.
pub fn configure(id: u64) -> String {
    json!({"id": id, "method": "mining.configure", "params": [["version-rolling"], {
        "version-rolling.mask": format!("{VERSION_ROLLING_MASK:08x}"),
        "version-rolling.min-bit-count": 2
    }]})
    .to_string()
}

/// `mining.suggest_difficulty`.
pub fn suggest_difficulty(id: u64, difficulty: f64) -> String {
    json!({"id": id, "method": "mining.suggest_difficulty", "params": [difficulty]}).to_string()
}

/// `mining.subscribe`.
pub fn subscribe(id: u64) -> String {
    json!({"id": id, "method": "mining.subscribe", "params": [concat!("hashpool-sim-miner/", env!("CARGO_PKG_VERSION"))]})
        .to_string()
}

/// `mining.extranonce.subscribe`.
pub fn extranonce_subscribe(id: u64) -> String {
    json!({"id": id, "method": "mining.extranonce.subscribe", "params": []}).to_string()
}

/// `mining.authorize`.
pub fn authorize(id: u64, user: &str) -> String {
    json!({"id": id, "method": "mining.authorize", "params": [user, "x"]}).to_string()
}

/// `mining.submit` (with version bits when rolling was negotiated).
pub fn submit(
    id: u64,
    user: &str,
    job_id: &str,
    extranonce2: &[u8],
    ntime: u32,
    nonce: u32,
    version_bits: Option<u32>,
) -> String {
    let mut params = vec![
        json!(user),
        json!(job_id),
        json!(hex::encode(extranonce2)),
        json!(format!("{ntime:08x}")),
        json!(format!("{nonce:08x}")),
    ];
    if let Some(bits) = version_bits {
        params.push(json!(format!("{bits:08x}")));
    }
    json!({"id": id, "method": "mining.submit", "params": params}).to_string()
}

/// The reason in an SV1 error (`[code, "message", data]` or an object), for logs and counts.
pub fn error_reason(error: &Value) -> String {
    match error {
        Value::Array(a) => a
            .get(1)
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string(),
        Value::Object(o) => o
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_ids_must_come_back_byte_for_byte() {
        let sent = with_string_id(&subscribe(7));
        assert!(sent.contains(r#""id":"sv1-7""#), "{sent}");
        let back = from_string_id(r#"{"id":"sv1-7","result":true,"error":null}"#).unwrap();
        assert!(back.contains(r#""id":7"#), "{back}");
        for bad in [
            r#"{"id":7,"result":true,"error":null}"#,
            r#"{"id":"sv1\u002d7","result":true,"error":null}"#,
            r#"{"id":"sv1-07","result":true,"error":null}"#,
        ] {
            assert!(from_string_id(bad).is_err(), "{bad} accepted");
        }
        let notify = r#"{"id":null,"method":"mining.set_difficulty","params":[1]}"#;
        assert_eq!(from_string_id(notify).unwrap(), notify);
    }

    #[test]
    fn notify_is_decoded() {
        let line = r#"{"id":null,"method":"mining.notify","params":["1a","0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20","aa","bb",[],"20000000","1e0377ae","65000000",true]}"#;
        let Inbound::Notify(job) = parse(line).unwrap() else {
            panic!("not a notify")
        };
        assert_eq!(job.job_id, "1a");
        assert_eq!(&job.prev_hash[..4], &[4, 3, 2, 1]);
        assert_eq!(job.nbits, 0x1e0377ae);
        assert!(job.clean);
    }

    #[test]
    fn responses_and_errors() {
        let r = parse(r#"{"id":7,"result":null,"error":[23,"difficulty-too-low",null]}"#).unwrap();
        let Inbound::Response { id, error, .. } = r else {
            panic!()
        };
        assert_eq!(id, 7);
        assert_eq!(error_reason(&error), "difficulty-too-low");
        assert!(parse("{not json").is_err());
    }
}
