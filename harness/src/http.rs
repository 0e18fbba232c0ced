//! A minimal HTTP/1.0 GET for the roles' metrics and health endpoints (no client library:
//! one request, read to end).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// GET `path` from `addr` (`host:port`); returns status and body.
pub async fn get(addr: &str, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    request(addr, "GET", path, None, timeout).await
}

/// POST a JSON `body` to `path` at `addr`; returns status and body.
pub async fn post_json(
    addr: &str,
    path: &str,
    body: &str,
    timeout: Duration,
) -> anyhow::Result<(u16, String)> {
    request(addr, "POST", path, Some(body), timeout).await
}

async fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<(u16, String)> {
    let fetch = async {
        let mut tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body.unwrap_or_default());
        tcp.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        tcp.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("no HTTP header from {addr}"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad status line from {addr}: {head}"))?;
        Ok((status, body.to_string()))
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| anyhow!("{method} http://{addr}{path}: no answer in {timeout:?}"))?
}

/// Prometheus text exposition parsed into `name{labels}` -> value.
#[derive(Debug, Clone, Default)]
pub struct Metrics(pub BTreeMap<String, f64>);

impl Metrics {
    /// Parse the text format (comments skipped).
    pub fn parse(text: &str) -> Self {
        let mut map = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            if let Some((key, value)) = line.rsplit_once(' ') {
                if let Ok(v) = value.parse::<f64>() {
                    map.insert(key.to_string(), v);
                }
            }
        }
        Self(map)
    }

    /// A value by exact key (`name` or `name{label="v"}`), 0 when absent (counters start absent).
    pub fn get(&self, key: &str) -> f64 {
        self.0.get(key).copied().unwrap_or(0.0)
    }

    /// Sum over every series of `name`.
    pub fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|(k, _)| k.as_str() == name || k.starts_with(&format!("{name}{{")))
            .map(|(_, v)| v)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labelled_and_plain_series() {
        let m = Metrics::parse("# HELP x\nx_total 3\ny{reason=\"a b\"} 2\ny{reason=\"c\"} 1\n");
        assert_eq!(m.get("x_total"), 3.0);
        assert_eq!(m.get("y{reason=\"a b\"}"), 2.0);
        assert_eq!(m.sum("y"), 3.0);
        assert_eq!(m.get("absent"), 0.0);
    }
}
