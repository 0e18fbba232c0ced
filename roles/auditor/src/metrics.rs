//! Prometheus metrics of the auditor (`hashpool_auditor_*`).

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};

pub(crate) struct Metrics {
    pub(crate) registry: Registry,
    pub(crate) verdicts: IntCounterVec,
    pub(crate) audit_seconds: Histogram,
    pub(crate) backlog: IntGauge,
    /// Verdicts reached on the audit node rewound to the template's parent.
    pub(crate) rewound: prometheus::IntCounter,
    /// Templates found `invalid` because the audit node never got their parent.
    pub(crate) unknown_parent: prometheus::IntCounter,
    /// Tasks left pending without a verdict for now (audited again later).
    pub(crate) not_yet: prometheus::IntCounter,
    /// Dead letters dropped from a full `audit:dead` (the oldest go first).
    pub(crate) dead_letters_dropped: prometheus::IntCounter,
    /// Acknowledged tasks trimmed from `audit:tasks`.
    pub(crate) trimmed: prometheus::IntCounter,
    /// Entries `audit:tasks` held after its last trim.
    pub(crate) stream_entries: IntGauge,
}

impl Metrics {
    pub(crate) fn new() -> prometheus::Result<Self> {
        let m = Self {
            registry: Registry::new(),
            verdicts: IntCounterVec::new(
                Opts::new(
                    "hashpool_auditor_verdicts_total",
                    "Verdicts written, by verdict",
                ),
                &["verdict"],
            )?,
            audit_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "hashpool_auditor_audit_seconds",
                    "Time to audit one template",
                )
                .buckets(vec![0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 2.0]),
            )?,
            backlog: IntGauge::with_opts(Opts::new(
                "hashpool_auditor_stream_backlog",
                "audit:tasks entries not yet audited by the group",
            ))?,
            rewound: prometheus::IntCounter::with_opts(Opts::new(
                "hashpool_auditor_rewound_audits_total",
                "Verdicts reached on the audit node rewound to the template's parent",
            ))?,
            unknown_parent: prometheus::IntCounter::with_opts(Opts::new(
                "hashpool_auditor_unknown_parent_total",
                "Templates invalid because the audit node never got their parent block",
            ))?,
            not_yet: prometheus::IntCounter::with_opts(Opts::new(
                "hashpool_auditor_not_yet_total",
                "Tasks left pending without a verdict for now, audited again later",
            ))?,
            dead_letters_dropped: prometheus::IntCounter::with_opts(Opts::new(
                "hashpool_auditor_dead_letters_dropped_total",
                "Oldest entries dropped from a full audit:dead (streams.dead_letters_max)",
            ))?,
            trimmed: prometheus::IntCounter::with_opts(Opts::new(
                "hashpool_auditor_stream_trimmed_total",
                "audit:tasks entries every reader had acknowledged, trimmed",
            ))?,
            stream_entries: IntGauge::with_opts(Opts::new(
                "hashpool_auditor_stream_entries",
                "Entries audit:tasks held after its last trim",
            ))?,
        };
        m.registry
            .register(Box::new(m.dead_letters_dropped.clone()))?;
        m.registry.register(Box::new(m.trimmed.clone()))?;
        m.registry.register(Box::new(m.stream_entries.clone()))?;
        m.registry.register(Box::new(m.rewound.clone()))?;
        m.registry.register(Box::new(m.not_yet.clone()))?;
        m.registry.register(Box::new(m.unknown_parent.clone()))?;
        m.registry.register(Box::new(m.verdicts.clone()))?;
        m.registry.register(Box::new(m.audit_seconds.clone()))?;
        m.registry.register(Box::new(m.backlog.clone()))?;
        Ok(m)
    }
}
