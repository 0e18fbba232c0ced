//! SV1 (JSON lines) for the miner side: requests in, responses and notifications out.

use serde_json::{json, Value};
use stratum_apps::stratum_core::mining_sv2::{NewExtendedMiningJobOwned, SetNewPrevHashOwned};
use stratum_apps::stratum_core::stratum_translation::sv2_to_sv1::build_sv1_notify_from_sv2;
use stratum_apps::stratum_core::sv1_api::json_rpc::Message;

/// Version bits a miner may roll (BIP320).
pub const VERSION_ROLLING_MASK: u32 = 0x1fff_e000;

/// Longest request id accepted, bytes of JSON (a share's id is kept until its answer).
pub const MAX_ID_BYTES: usize = 256;

/// A request's id as the miner wrote it (JSON text: a number, a string, null or any other
/// JSON value), so its answer carries the same id: byte for byte, except an array or object
/// id, echoed compact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Id(Box<str>);

impl Id {
    /// The id's JSON text.
    pub fn json(&self) -> &str {
        &self.0
    }
}

/// A request from a miner.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Its id, echoed back as sent.
    pub id: Id,
    /// Method name.
    pub method: String,
    /// Parameters (always an array).
    pub params: Vec<Value>,
}

/// Parse one line; `Err` describes what is malformed (the connection is then closed).
pub fn parse_request(line: &str) -> Result<Request, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON ({e})"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let method = obj
        .get("method")
        .and_then(Value::as_str)
        .ok_or("no method")?
        .to_string();
    #[derive(serde::Deserialize)]
    struct RawId<'a> {
        #[serde(borrow)]
        id: &'a serde_json::value::RawValue,
    }
    if !obj.contains_key("id") {
        return Err("no id".into());
    }
    let raw = serde_json::from_str::<RawId>(line)
        .map_err(|e| format!("id: {e}"))?
        .id
        .get();
    if raw.len() > MAX_ID_BYTES {
        return Err(format!("id longer than {MAX_ID_BYTES} bytes"));
    }
    // Numbers, strings, true, false and null are echoed as written; an array or object id is
    // echoed compact, so no whitespace the miner put in it (a carriage return) reaches the
    // answer line.
    let id = match obj.get("id") {
        Some(v @ (Value::Array(_) | Value::Object(_))) => Id(v.to_string().into()),
        _ => Id(raw.into()),
    };
    let params = match obj.get("params") {
        Some(Value::Array(a)) => a.clone(),
        None | Some(Value::Null) => Vec::new(),
        Some(_) => return Err("params is not an array".into()),
    };
    Ok(Request { id, method, params })
}

/// `{"id":id,"result":result,"error":null}`.
pub fn ok(id: &Id, result: Value) -> String {
    format!(r#"{{"id":{},"result":{result},"error":null}}"#, id.json())
}

/// `{"id":id,"result":null,"error":[code,message,null]}`.
pub fn error(id: &Id, code: i32, message: &str) -> String {
    format!(
        r#"{{"id":{},"result":null,"error":{}}}"#,
        id.json(),
        json!([code, message, null])
    )
}

/// SV1 error number for an SV2 share error code (the message keeps the SV2 code).
pub fn sv1_code(sv2_code: &str) -> i32 {
    match sv2_code {
        "invalid-job-id" | "stale-share" => 21,
        "duplicate-share" => 22,
        "difficulty-too-low" => 23,
        _ => 20,
    }
}

/// `mining.subscribe` result.
pub fn subscribe_result(extranonce1: &[u8], extranonce2_size: usize) -> Value {
    json!([
        [["mining.set_difficulty", "1"], ["mining.notify", "1"]],
        hex::encode(extranonce1),
        extranonce2_size
    ])
}

/// `mining.set_difficulty` for a target (little-endian), rounded so the miner's target is never
/// easier than the pool's.
pub fn set_difficulty(target_le: &[u8; 32]) -> String {
    json!({"id": null, "method": "mining.set_difficulty", "params": [difficulty(target_le)]})
        .to_string()
}

/// `mining.set_extranonce`.
pub fn set_extranonce(extranonce1: &[u8], extranonce2_size: usize) -> String {
    json!({"id": null, "method": "mining.set_extranonce", "params": [hex::encode(extranonce1), extranonce2_size]})
        .to_string()
}

/// Pool difficulty of a target: `0xffff * 2^208 / target`, nudged up by one part in 10^9.
pub fn difficulty(target_le: &[u8; 32]) -> f64 {
    let target = target_le
        .iter()
        .rev()
        .fold(0.0f64, |acc, b| acc * 256.0 + f64::from(*b));
    let diff1 = 65535.0 * 2f64.powi(208);
    (diff1 / target.max(1.0)) * (1.0 + 1e-9)
}

/// The target (little-endian) of SV1 `difficulty` (difficulty 1 is `0xffff * 2^208`); `None`
/// unless it is a positive finite number. Difficulties below 2^-48 give the easiest target.
pub fn target_for_difficulty(difficulty: f64) -> Option<[u8; 32]> {
    if !(difficulty.is_finite() && difficulty > 0.0) {
        return None;
    }
    // target = (65535 / d) * 2^208 = y * 2^144 with y = (65535 / d) * 2^64, below 2^112 for
    // d above 2^-48 (so it fits bytes 18..32).
    let x = 65535.0 / difficulty;
    if x >= 2f64.powi(48) {
        return Some([0xff; 32]);
    }
    let y = (x * 2f64.powi(64)) as u128;
    let mut t = [0u8; 32];
    t[18..32].copy_from_slice(&y.to_le_bytes()[..14]);
    if t == [0u8; 32] {
        t[0] = 1;
    }
    Some(t)
}

/// `mining.notify` for a job on a tip.
pub fn notify(
    snph: &SetNewPrevHashOwned,
    job: &NewExtendedMiningJobOwned,
    clean: bool,
) -> Result<String, String> {
    let n = build_sv1_notify_from_sv2(snph.clone(), job.clone(), clean)
        .map_err(|e| format!("notify: {e:?}"))?;
    let msg: Message = n.into();
    serde_json::to_string(&msg).map_err(|e| e.to_string())
}

/// Parsed `mining.submit` parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submit {
    /// Worker name.
    pub user: String,
    /// SV2 job id.
    pub job_id: u32,
    /// Rollable extranonce.
    pub extranonce2: Vec<u8>,
    /// Header time.
    pub ntime: u32,
    /// Nonce.
    pub nonce: u32,
    /// Rolled version bits.
    pub version_bits: Option<u32>,
}

fn hex_u32(v: &Value, what: &str) -> Result<u32, String> {
    match v {
        Value::String(s) => u32::from_str_radix(s, 16).map_err(|e| format!("{what} {s:?}: {e}")),
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or(format!("{what} out of range")),
        _ => Err(format!("{what} is not a hex string")),
    }
}

/// Parse `mining.submit` params.
pub fn parse_submit(params: &[Value]) -> Result<Submit, String> {
    if !(5..=6).contains(&params.len()) {
        return Err(format!(
            "mining.submit takes 5 or 6 params, got {}",
            params.len()
        ));
    }
    let s = |i: usize| {
        params[i]
            .as_str()
            .ok_or(format!("param {i} is not a string"))
    };
    Ok(Submit {
        user: s(0)?.to_string(),
        job_id: s(1)?
            .parse()
            .map_err(|_| format!("unknown job id {:?}", params[1]))?,
        extranonce2: hex::decode(s(2)?).map_err(|e| format!("extranonce2: {e}"))?,
        ntime: hex_u32(&params[3], "ntime")?,
        nonce: hex_u32(&params[4], "nonce")?,
        version_bits: params
            .get(5)
            .map(|v| hex_u32(v, "version bits"))
            .transpose()?,
    })
}

/// SV1 lines of at most `max` bytes. A longer line is refused as soon as `max + 1`
/// bytes came without a newline, so a miner cannot make the proxy buffer without bound. Safe
/// to cancel in `select!`: bytes read so far stay in `buf`.
pub struct LineReader {
    inner: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    buf: Vec<u8>,
    max: usize,
}

impl LineReader {
    /// Read lines of at most `max` bytes from `read`.
    pub fn new(read: tokio::net::tcp::OwnedReadHalf, max: usize) -> Self {
        Self {
            inner: tokio::io::BufReader::new(read),
            buf: Vec::new(),
            max,
        }
    }

    /// The next line (without its newline), `None` at end of stream.
    pub async fn next_line(&mut self) -> Result<Option<String>, String> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt};
        loop {
            let room = (self.max + 1).saturating_sub(self.buf.len());
            if room == 0 {
                return Err(format!(
                    "line over {} bytes without a newline (malformed SV1 input)",
                    self.max
                ));
            }
            let n = (&mut self.inner)
                .take(room as u64)
                .read_until(b'\n', &mut self.buf)
                .await
                .map_err(|e| format!("read error: {e}"))?;
            if self.buf.last() == Some(&b'\n') {
                let mut line = std::mem::take(&mut self.buf);
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return String::from_utf8(line)
                    .map(Some)
                    .map_err(|_| "malformed SV1 input: a line is not UTF-8".to_string());
            }
            if n == 0 {
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_must_be_objects_with_an_id_of_any_type_echoed_as_sent() {
        assert!(
            parse_request("{\"id\": 1, \"method\": \"mining.subscribe\", \"params\": []}").is_ok()
        );
        assert!(parse_request("{this is not json").is_err());
        assert!(parse_request("{\"method\": \"x\", \"params\": []}").is_err());
        assert!(parse_request("[1,2]").is_err());
        for id in [
            "\"a\"",
            "-3",
            "1.5",
            "null",
            "18446744073709551616",
            "{\"k\":[1]}",
        ] {
            let r = parse_request(&format!(
                "{{\"id\": {id}, \"method\": \"x\", \"params\": []}}"
            ))
            .unwrap();
            let answer: Value = serde_json::from_str(&ok(&r.id, json!(true))).unwrap();
            assert_eq!(answer["result"], json!(true), "a JSON answer");
            let text = ok(&r.id, json!(true));
            assert!(text.starts_with(&format!("{{\"id\":{id},")), "{text}");
            let answer: Value = serde_json::from_str(&error(&r.id, 20, "x")).unwrap();
            assert_eq!(answer["error"], json!([20, "x", null]));
            let text = error(&r.id, 20, "x");
            assert!(text.starts_with(&format!("{{\"id\":{id},")), "{text}");
        }
        let r = parse_request("{\"id\": [1,\r 2], \"method\": \"x\"}").unwrap();
        assert_eq!(
            ok(&r.id, json!(true)),
            r#"{"id":[1,2],"result":true,"error":null}"#
        );
        let long = format!("\"{}\"", "a".repeat(MAX_ID_BYTES));
        assert!(parse_request(&format!("{{\"id\": {long}, \"method\": \"x\"}}")).is_err());
    }

    #[test]
    fn submit_params_are_checked() {
        let p: Vec<Value> = serde_json::from_str(
            r#"["w","7","00000000000000000000000000000001","65000000","0000abcd","00002000"]"#,
        )
        .unwrap();
        let s = parse_submit(&p).unwrap();
        assert_eq!(
            (s.job_id, s.nonce, s.version_bits),
            (7, 0xabcd, Some(0x2000))
        );
        assert_eq!(s.extranonce2.len(), 16);
        assert!(parse_submit(&p[..3]).is_err());
    }

    #[test]
    fn a_suggested_difficulty_gives_the_target_of_that_difficulty() {
        for d in [1.0, 0.5, 2.0e-4, 1.5e-5, 1024.0, 3.0e9] {
            let t = target_for_difficulty(d).unwrap();
            let back = difficulty(&t);
            assert!((back / d - 1.0).abs() < 1e-6, "{d} -> {back}");
        }
        assert_eq!(target_for_difficulty(1e-30), Some([0xff; 32]));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(target_for_difficulty(bad), None);
        }
    }

    #[test]
    fn difficulty_one_target_gives_difficulty_one() {
        let mut t = [0u8; 32];
        t[26] = 0xff;
        t[27] = 0xff; // 0xffff * 2^208, little-endian
        let d = difficulty(&t);
        assert!((d - 1.0).abs() < 1e-6 && d > 1.0, "{d}");
    }
}
