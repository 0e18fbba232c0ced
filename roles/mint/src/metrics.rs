//! Prometheus metrics of the mint (`hashpool_mint_*`), served on the mint's HTTP port.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Every metric of the mint.
pub struct MintMetrics {
    registry: Registry,
    /// Quotes by event: `created` (from a share record), `paid` (credited after a valid
    /// audit). FAILED quotes are those of `invalid` templates.
    pub quotes: IntCounterVec,
    /// Verdicts read, by verdict.
    pub templates: IntCounterVec,
    /// Stream entries that could not be read, by stream.
    pub unreadable: IntCounterVec,
    /// Entries sent to `mint:dead` (never processable), by stream.
    pub dead_letters: IntCounterVec,
    /// Batches that failed and will be read again (database or Redis unavailable), by stream.
    pub batch_failures: IntCounterVec,
    /// Entries of a stream not yet processed by the mint's group (lag + pending).
    pub backlog: IntGaugeVec,
    /// Dead letters dropped from a full `mint:dead` (the oldest go first).
    pub dead_letters_dropped: IntCounter,
    /// Acknowledged entries trimmed, by stream.
    pub trimmed: IntCounterVec,
    /// Trim rounds done, by stream.
    pub trim_rounds: IntCounterVec,
    /// Entries a stream held after its last trim, by stream.
    pub stream_entries: IntGaugeVec,
    /// Time from a share record's append to its quote being committed.
    pub record_to_quote_seconds: Histogram,
    /// Time from a share record's append to its quote being paid.
    pub record_to_paid_seconds: Histogram,
    /// The Lightning redemption reserve, by quantity.
    pub redemption: IntGaugeVec,
    /// Held payments resolved, by outcome: `paid`, `failed` (Core Lightning failed it),
    /// `orphaned` (pending with no HTLC anywhere), `never_sent` (no payment after the grace),
    /// `not_sent` (the payment call failed before reaching the node).
    pub holds_resolved: IntCounterVec,
    /// Held payments now, and the age of the oldest (seconds).
    pub holds: IntGaugeVec,
}

impl MintMetrics {
    /// Register everything.
    pub fn new() -> prometheus::Result<Self> {
        let buckets = vec![
            0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
        ];
        let m = Self {
            registry: Registry::new(),
            quotes: IntCounterVec::new(
                Opts::new("hashpool_mint_quotes_total", "ehash quotes, by event"),
                &["event"],
            )?,
            templates: IntCounterVec::new(
                Opts::new(
                    "hashpool_mint_verdicts_total",
                    "Audit verdicts read, by verdict",
                ),
                &["verdict"],
            )?,
            unreadable: IntCounterVec::new(
                Opts::new(
                    "hashpool_mint_unreadable_records_total",
                    "Stream entries that could not be read, by stream",
                ),
                &["stream"],
            )?,
            dead_letters: IntCounterVec::new(
                Opts::new(
                    "hashpool_mint_dead_letters_total",
                    "Entries sent to mint:dead because they can never be processed, by stream",
                ),
                &["stream"],
            )?,
            batch_failures: IntCounterVec::new(
                Opts::new(
                    "hashpool_mint_batch_failures_total",
                    "Batches that failed and were read again, nothing acknowledged, by stream",
                ),
                &["stream"],
            )?,
            backlog: IntGaugeVec::new(
                Opts::new(
                    "hashpool_mint_stream_backlog",
                    "Entries not yet processed by the mint, by stream",
                ),
                &["stream"],
            )?,
            dead_letters_dropped: IntCounter::new(
                "hashpool_mint_dead_letters_dropped_total",
                "Oldest entries dropped from a full mint:dead (streams.dead_letters_max)",
            )?,
            trimmed: IntCounterVec::new(
                Opts::new(
                    "hashpool_mint_stream_trimmed_total",
                    "Entries every reader had acknowledged, trimmed, by stream",
                ),
                &["stream"],
            )?,
            trim_rounds: IntCounterVec::new(
                Opts::new(
                    "hashpool_mint_stream_trim_rounds_total",
                    "Trim rounds done, by stream",
                ),
                &["stream"],
            )?,
            stream_entries: IntGaugeVec::new(
                Opts::new(
                    "hashpool_mint_stream_entries",
                    "Entries a stream held after its last trim, by stream",
                ),
                &["stream"],
            )?,
            record_to_quote_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "hashpool_mint_record_to_quote_seconds",
                    "Share record appended to quote committed",
                )
                .buckets(buckets.clone()),
            )?,
            record_to_paid_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "hashpool_mint_settlement_seconds",
                    "Share record appended to its quote paid",
                )
                .buckets(buckets),
            )?,
            redemption: IntGaugeVec::new(
                Opts::new(
                    "hashpool_mint_redemption",
                    "Lightning redemption: matured_sat, pool_fee_sat, redeemed_msat, held_msat, available_msat, outstanding_ehash, rate_msat_per_ehash",
                ),
                &["quantity"],
            )?,
            holds_resolved: IntCounterVec::new(
                Opts::new(
                    "hashpool_mint_holds_resolved_total",
                    "Held redemption payments resolved without an operator, by outcome",
                ),
                &["outcome"],
            )?,
            holds: IntGaugeVec::new(
                Opts::new(
                    "hashpool_mint_holds",
                    "Held redemption payments: count, oldest_seconds",
                ),
                &["quantity"],
            )?,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.holds_resolved.clone()),
            Box::new(m.holds.clone()),
            Box::new(m.quotes.clone()),
            Box::new(m.templates.clone()),
            Box::new(m.unreadable.clone()),
            Box::new(m.dead_letters.clone()),
            Box::new(m.batch_failures.clone()),
            Box::new(m.backlog.clone()),
            Box::new(m.dead_letters_dropped.clone()),
            Box::new(m.trimmed.clone()),
            Box::new(m.trim_rounds.clone()),
            Box::new(m.stream_entries.clone()),
            Box::new(m.record_to_quote_seconds.clone()),
            Box::new(m.record_to_paid_seconds.clone()),
            Box::new(m.redemption.clone()),
        ];
        for c in collectors {
            m.registry.register(c)?;
        }
        Ok(m)
    }

    /// Record the held payments (`since` in Unix seconds) at `now`.
    pub fn observe_holds(&self, holds: &[crate::redeem::ledger::Hold], now: u64) {
        let oldest = holds
            .iter()
            .map(|h| now.saturating_sub(h.since))
            .max()
            .unwrap_or(0);
        self.holds
            .with_label_values(&["count"])
            .set(holds.len() as i64);
        self.holds
            .with_label_values(&["oldest_seconds"])
            .set(i64::try_from(oldest).unwrap_or(i64::MAX));
    }

    /// Record the redemption reserve.
    pub fn observe_reserve(&self, r: &crate::redeem::ledger::Reserve) {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for (q, v) in [
            ("matured_sat", r.matured_sat),
            ("pool_fee_sat", r.pool_fee_sat),
            ("redeemed_msat", r.redeemed_msat),
            ("held_msat", r.held_msat),
            ("redeemable_msat", r.redeemable_msat),
            ("available_msat", r.available_msat),
            ("outstanding_ehash", r.outstanding_ehash),
            ("rate_msat_per_ehash", r.rate_msat_per_ehash() as u64),
        ] {
            self.redemption.with_label_values(&[q]).set(clamp(v));
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}
