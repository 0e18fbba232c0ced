//! The SV2 sniffer's added latency, in process: round trips of one `SetTarget` frame over
//! Noise to an echo endpoint, directly and through the sniffer (which decrypts, decodes,
//! records and re-encrypts each frame both ways). The direct round trip, measured in the same
//! run, is the limit; the sniffer's cost per message is half the difference of the medians.

use std::time::{Duration, Instant};

use harness::sniffer::{echo::EchoEndpoint, Sv2Sniffer};
use harness::sv2_client::Sv2Client;
use stratum_apps::stratum_core::mining_sv2::SetTargetOwned;
use stratum_apps::stratum_core::parsers_sv2::{AnyMessageOwned, MiningOwned};

const ROUND_TRIPS: usize = 20_000;

async fn round_trips(addr: &str, authority: &str) -> anyhow::Result<Vec<Duration>> {
    let mut client = Sv2Client::connect(addr, authority).await?;
    let mut out = Vec::with_capacity(ROUND_TRIPS);
    for i in 0..ROUND_TRIPS {
        let msg = AnyMessageOwned::Mining(MiningOwned::SetTarget(SetTargetOwned {
            channel_id: i as u32,
            maximum_target: [0xffu8; 32].into(),
        }));
        let start = Instant::now();
        client.send(msg).await?;
        client.recv(Duration::from_secs(5)).await?;
        out.push(start.elapsed());
    }
    out.sort();
    Ok(out)
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let keys = harness::keys::authority_keys();
    let echo = EchoEndpoint::start("127.0.0.1:0", &keys).await?;
    let sniffer = Sv2Sniffer::start("127.0.0.1:0", echo.addr(), &keys).await?;
    let direct = round_trips(echo.addr(), &keys.public).await?;
    let sniffed = round_trips(sniffer.addr(), &keys.public).await?;
    println!("| path | round trips | p50 | p99 |");
    println!("|---|---|---|---|");
    for (name, v) in [
        ("direct (the limit)", &direct),
        ("through the sniffer", &sniffed),
    ] {
        println!(
            "| {name} | {} | {:.1} us | {:.1} us |",
            v.len(),
            micros(v[v.len() / 2]),
            micros(v[v.len() * 99 / 100])
        );
    }
    let added = (micros(sniffed[sniffed.len() / 2]) - micros(direct[direct.len() / 2])) / 2.0;
    println!(
        "\nadded per message (half the difference of the medians): {added:.1} us; frames recorded: {}",
        sniffer.captured().len()
    );
    Ok(())
}
