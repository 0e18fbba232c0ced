//! Redis steps: streams and their durability.

use anyhow::Context;
use cucumber::{then, when};
use redis::streams::StreamRangeReply;
use redis::AsyncCommands;

use crate::world::HarnessWorld;

type Entries = Vec<(String, Vec<(String, String)>)>;

async fn read_stream(w: &HarnessWorld, stream: &str) -> anyhow::Result<Entries> {
    let mut conn = w.default_stack()?.redis()?.connect().await?;
    let reply: StreamRangeReply = conn.xrange_all(stream).await?;
    let mut entries = Vec::new();
    for id in reply.ids {
        let mut fields: Vec<(String, String)> = Vec::new();
        for (k, v) in id.map {
            fields.push((
                k,
                redis::from_redis_value(v).context("field is not a string")?,
            ));
        }
        fields.sort();
        entries.push((id.id, fields));
    }
    Ok(entries)
}

#[when(expr = "{int} entries are appended to the stream {string}")]
async fn append(w: &mut HarnessWorld, n: usize, stream: String) -> anyhow::Result<()> {
    let mut conn = w.default_stack()?.redis()?.connect().await?;
    for i in 0..n {
        let _: String = conn
            .xadd(
                &stream,
                "*",
                &[
                    ("v", "1".to_string()),
                    ("seq", i.to_string()),
                    ("share_hash", format!("{i:064x}")),
                ],
            )
            .await?;
    }
    w.stream_before = read_stream(w, &stream).await?;
    anyhow::ensure!(
        w.stream_before.len() == n,
        "stream has {} entries after {n} XADDs",
        w.stream_before.len()
    );
    Ok(())
}

#[then(expr = "the stream {string} holds the same {int} entries")]
async fn same_entries(w: &mut HarnessWorld, stream: String, n: usize) -> anyhow::Result<()> {
    let now = read_stream(w, &stream).await?;
    anyhow::ensure!(
        now.len() == n,
        "stream has {} entries, expected {n}",
        now.len()
    );
    anyhow::ensure!(
        now == w.stream_before,
        "entries differ from those read before the fault"
    );
    Ok(())
}
