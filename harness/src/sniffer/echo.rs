//! An SV2 endpoint that answers every frame with the same frame, over real Noise: the far end
//! for the sniffer's own tests and its latency benchmark (it is not a pool).

use std::str::FromStr;
use std::time::Duration;

use anyhow::{anyhow, Context};
use stratum_apps::key_utils::{Secp256k1PublicKey, Secp256k1SecretKey};
use stratum_apps::network_helpers::noise_stream::NoiseTcpStream;
use stratum_apps::stratum_core::noise_sv2::Responder;
use tokio::net::TcpListener;

use crate::keys::AuthorityKeys;

/// A running echo endpoint; stops when dropped.
pub struct EchoEndpoint {
    addr: String,
    task: tokio::task::JoinHandle<()>,
}

impl EchoEndpoint {
    /// Listen on `listen` with authority key pair `keys`.
    pub async fn start(listen: &str, keys: &AuthorityKeys) -> anyhow::Result<Self> {
        let public = Secp256k1PublicKey::from_str(&keys.public)
            .map_err(|e| anyhow!("authority public key: {e:?}"))?
            .into_bytes();
        let secret = Secp256k1SecretKey::from_str(&keys.secret)
            .map_err(|e| anyhow!("authority secret key: {e:?}"))?
            .into_bytes();
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("echo endpoint cannot listen on {listen}"))?;
        let addr = listener.local_addr()?.to_string();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                tokio::spawn(async move {
                    let Ok(responder) =
                        Responder::from_authority_kp(&public, &secret, Duration::from_secs(3600))
                    else {
                        return;
                    };
                    let Ok(stream) =
                        NoiseTcpStream::accept(tcp, responder, Duration::from_secs(10)).await
                    else {
                        return;
                    };
                    let (mut r, mut w) = stream.into_split();
                    while let Ok(frame) = r.read_frame().await {
                        if w.write_frame(frame).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(Self { addr, task })
    }

    /// `host:port` to connect to.
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl Drop for EchoEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}
