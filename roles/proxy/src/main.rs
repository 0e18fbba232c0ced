//! `hashpool-proxy`: load the config, run the proxy until SIGTERM or SIGINT.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use hashpool_config::miner_side::{ProxyConfig, PROXY_ENV_PREFIX};

/// The hashpool proxy (SV1 for miners, all miners on one SV2 connection to the pool, a channel each) and the
/// operator's ehash wallet.
#[derive(Parser, Debug)]
#[command(name = "hashpool-proxy", version)]
struct Args {
    /// TOML config file; `HASHPOOL_PROXY__*` variables override it (e.g. HASHPOOL_PROXY__LISTEN).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The ehash wallet (needs `mint_url` and `locking_secret_key` in the config).
    Wallet {
        #[command(subcommand)]
        action: WalletAction,
    },
}

#[derive(Subcommand, Debug)]
enum WalletAction {
    /// Print ehash held, minted, pending, paid but not minted yet, and failed, as JSON (a
    /// signed lookup at the mint; mints nothing).
    Balance,
    /// Redeem ehash for sats: melt (NUT-05) against a BOLT11 invoice of your own Lightning
    /// node, paid by the pool's node at the mint's rate; prints what was spent as JSON. Refused,
    /// with nothing spent, when rounding to whole ehash would lose more than
    /// `max_rounding_loss_ppm` of the value unless --accept-loss.
    Redeem {
        /// The invoice (it must carry an amount); a new melt quote is made for it.
        #[arg(long, conflicts_with = "quote", required_unless_present = "quote")]
        invoice: Option<String>,
        /// Pay a melt quote made earlier with `wallet quote` instead.
        #[arg(long)]
        quote: Option<String>,
        /// Melt even if rounding loses more than the wallet's limit.
        #[arg(long)]
        accept_loss: bool,
    },
    /// Ask the mint for a melt quote for a BOLT11 invoice and print what it costs in ehash and
    /// what rounding to whole ehash loses, as JSON; nothing is spent (pay it with
    /// `wallet redeem --quote`).
    Quote {
        /// The invoice (it must carry an amount).
        #[arg(long)]
        invoice: String,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match args.command {
        None => {
            hashpool_config::role_main::run(
                PROXY_ENV_PREFIX,
                args.config.as_deref(),
                |c: ProxyConfig, stop| proxy::run(c, stop),
            )
            .await
        }
        Some(Command::Wallet {
            action: WalletAction::Balance,
        }) => {
            hashpool_config::role_main::run(
                PROXY_ENV_PREFIX,
                args.config.as_deref(),
                |c: ProxyConfig, _stop| async move {
                    anyhow::ensure!(
                        !c.mint_url.is_empty(),
                        "no `mint_url` in the config: this proxy has no wallet"
                    );
                    let status = proxy::wallet::balance(
                        &c.mint_url,
                        c.locking_secret_key.expose(),
                        std::path::Path::new(&c.data_dir),
                    )
                    .await?;
                    println!("{}", serde_json::to_string_pretty(&status)?);
                    Ok(())
                },
            )
            .await
        }
        Some(Command::Wallet {
            action: WalletAction::Quote { invoice },
        }) => {
            hashpool_config::role_main::run(
                PROXY_ENV_PREFIX,
                args.config.as_deref(),
                |c: ProxyConfig, _stop| async move {
                    anyhow::ensure!(
                        !c.mint_url.is_empty(),
                        "no `mint_url` in the config: this proxy has no wallet"
                    );
                    let q = proxy::wallet::quote_with(
                        &c.mint_url,
                        c.locking_secret_key.expose(),
                        std::path::Path::new(&c.data_dir),
                        &c.http_listen,
                        &invoice,
                    )
                    .await?;
                    println!("{}", serde_json::to_string_pretty(&q)?);
                    Ok(())
                },
            )
            .await
        }
        Some(Command::Wallet {
            action:
                WalletAction::Redeem {
                    invoice,
                    quote,
                    accept_loss,
                },
        }) => {
            hashpool_config::role_main::run(
                PROXY_ENV_PREFIX,
                args.config.as_deref(),
                |c: ProxyConfig, _stop| async move {
                    anyhow::ensure!(
                        !c.mint_url.is_empty(),
                        "no `mint_url` in the config: this proxy has no wallet"
                    );
                    let opts = proxy::wallet::RedeemOptions {
                        invoice,
                        quote,
                        accept_loss,
                    };
                    let r = proxy::wallet::redeem_with(
                        &c.mint_url,
                        c.locking_secret_key.expose(),
                        std::path::Path::new(&c.data_dir),
                        &c.http_listen,
                        c.max_rounding_loss_ppm,
                        &opts,
                    )
                    .await?;
                    println!("{}", serde_json::to_string_pretty(&r)?);
                    anyhow::ensure!(
                        r.state == "PAID",
                        "the redemption ended {}{} (PENDING: the proxy's wallet keeps asking the mint until it is final; FAILED or UNPAID: its ehash is back)",
                        r.state,
                        r.reason.as_deref().map(|w| format!(": {w}")).unwrap_or_default()
                    );
                    Ok(())
                },
            )
            .await
        }
    }
}
