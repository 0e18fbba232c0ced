//! The hashpool auditor role: consumer group `auditors` on `audit:tasks`, `workers`
//! concurrent audits per process (several processes may share the group). Each task gets a
//! verdict from Bitcoin Core and the pool policy (`check.rs`), asked of the auditor's own
//! bitcoind (the audit node, `node.rs`: rewound to a template's parent when that parent is no
//! longer its tip, so every template is judged on its content); the verdict goes to
//! `audit:results` (an invalid one also to `audit:dead`, with the task, for analysis) in one
//! Redis function that also acknowledges the task and writes each template's verdict once,
//! so a task reclaimed from a dead auditor never gets a second verdict.
//!
//! `run(config, shutdown)` is the whole role; `main.rs` only loads the config.

mod check;
mod metrics;
pub mod node;

mod startup;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use axum::extract::State;
use axum::routing::get;
use axum::Router;
use bitcoind_rpc::BitcoinRpc;
use ehash::{
    AuditResult, AuditTask, Verdict, AUDIT_DEAD_STREAM, AUDIT_RESULTS_STREAM, AUDIT_TASKS_STREAM,
};
use hashpool_config::pool_side::AuditorConfig;
use hashpool_streams::{Consumer, Entry};
use prometheus::Encoder;
use tokio_util::sync::CancellationToken;

pub use check::{audit, INCONCLUSIVE, UNKNOWN_PARENT};
pub use node::{AuditNode, NotYet, Rewind};

use metrics::Metrics;

/// Consumer group of the auditors.
pub const GROUP: &str = "auditors";
/// How long a read blocks for new tasks.
const BLOCK: Duration = Duration::from_millis(500);
/// How often tasks abandoned by a dead auditor are looked for.
const RECLAIM_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for one Redis answer.
const REDIS_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one worker retries a task without a verdict before it moves on.
const NOT_YET_PATIENCE: Duration = Duration::from_secs(3);
/// Verdict markers outlive any template's shares by far.
const VERDICT_MARKER_TTL_SECS: u64 = 90 * 24 * 3600;

/// The auditor's Redis function: write a template's verdict once, and acknowledge the task.
const LIBRARY: &str = r#"#!lua name=hashpool_auditor2

-- KEYS: audit:results, audit:dead, audit:tasks, the template's verdict marker.
-- ARGV: group, task entry id, marker ttl, most dead letters kept, number of result
--       arguments n, n result field/value arguments, then the dead-letter record's
--       arguments (if any).
-- Returns {1 if this call wrote the verdict, dead letters dropped to make room}.
local function verdict(keys, args)
  local n = tonumber(args[5])
  local written, dropped = 0, 0
  if redis.call('EXISTS', keys[4]) == 0 then
    local result = {}
    for i = 6, 5 + n do result[#result + 1] = args[i] end
    redis.call('XADD', keys[1], '*', unpack(result))
    if #args > 5 + n then
      local dead = {}
      for i = 6 + n, #args do dead[#dead + 1] = args[i] end
      dropped = math.max(0, redis.call('XLEN', keys[2]) + 1 - tonumber(args[4]))
      redis.call('XADD', keys[2], 'MAXLEN', args[4], '*', unpack(dead))
    end
    -- The marker last: a failure before it leaves the task to be retried.
    redis.call('SET', keys[4], '1', 'EX', tonumber(args[3]))
    written = 1
  end
  redis.call('XACK', keys[3], args[1], args[2])
  return {written, dropped}
end

redis.register_function('hashpool_verdict2', verdict)
"#;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Write `result` (and, if invalid, the dead-letter record, `audit:dead` keeping its newest
/// `dead_max`) once per template, and acknowledge task entry `entry`. Returns whether this
/// call wrote the verdict, and how many old dead letters went to make room.
async fn write_verdict(
    conn: &mut redis::aio::MultiplexedConnection,
    entry: &str,
    task: Option<&AuditTask>,
    result: &AuditResult,
    dead_max: u64,
) -> anyhow::Result<(bool, u64)> {
    let fields = result.to_fields();
    let mut cmd = redis::cmd("FCALL");
    cmd.arg("hashpool_verdict2")
        .arg(4)
        .arg(AUDIT_RESULTS_STREAM)
        .arg(AUDIT_DEAD_STREAM)
        .arg(AUDIT_TASKS_STREAM)
        .arg(ehash::ids::verdict_marker_key(result.template_id))
        .arg(GROUP)
        .arg(entry)
        .arg(VERDICT_MARKER_TTL_SECS)
        .arg(dead_max)
        .arg(fields.len() * 2);
    for (k, v) in &fields {
        cmd.arg(*k).arg(v);
    }
    if result.verdict == Verdict::Invalid {
        let mut dead = task.map(AuditTask::to_fields).unwrap_or_default();
        dead.push(("reason", result.reason.clone()));
        dead.push(("audited_at", result.audited_at.to_string()));
        dead.push(("task_entry", entry.to_string()));
        for (k, v) in &dead {
            cmd.arg(*k).arg(v);
        }
    }
    let timeout = REDIS_TIMEOUT;
    let call = |conn: &mut redis::aio::MultiplexedConnection| {
        let cmd = cmd.clone();
        let mut conn = conn.clone();
        async move {
            tokio::time::timeout(timeout, cmd.query_async::<(u64, u64)>(&mut conn))
                .await
                .map_err(|_| anyhow!("Redis did not answer within {timeout:?}"))
        }
    };
    match call(conn).await? {
        Ok((n, dropped)) => Ok((n == 1, dropped)),
        Err(e) if e.to_string().contains("Function not found") => {
            redis::cmd("FUNCTION")
                .arg("LOAD")
                .arg("REPLACE")
                .arg(LIBRARY)
                .query_async::<String>(conn)
                .await?;
            let (n, dropped) = call(conn).await??;
            Ok((n == 1, dropped))
        }
        Err(e) => Err(e.into()),
    }
}

/// The verdict on `task`, retried for a few seconds while there is none yet (a new block
/// reaches the audit node a moment after the pool); `None` when there is still none: the task
/// stays pending and another round claims it again after `reclaim_idle_ms`, so it does not hold
/// up the tasks behind it. `Err` when bitcoind does not answer.
async fn audit_patiently(
    node: &AuditNode,
    metrics: &Metrics,
    task: &AuditTask,
) -> anyhow::Result<Option<(Verdict, String)>> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        match audit(node, task).await {
            Ok(v) => return Ok(Some(v)),
            Err(NotYet::Rpc(e)) => {
                return Err(anyhow!(e).context(format!("template {}", task.template_id)))
            }
            Err(e) if started.elapsed() >= NOT_YET_PATIENCE => {
                metrics.not_yet.inc();
                tracing::info!(
                    template = task.template_id,
                    "no verdict yet, the task stays pending and is audited again later: {e}"
                );
                return Ok(None);
            }
            Err(_) => {}
        }
        // Waiting for the audit node to catch up with the pool's.
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(800));
    }
}

/// Audit one entry and write its verdict. `Err` leaves the task pending (retried).
async fn handle(
    node: &AuditNode,
    conn: &mut redis::aio::MultiplexedConnection,
    metrics: &Metrics,
    e: &Entry,
    dead_max: u64,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let (task, template_id, verdict, reason) = match AuditTask::from_fields(&e.fields) {
        Ok(t) => {
            let Some((v, r)) = audit_patiently(node, metrics, &t).await? else {
                return Ok(());
            };
            let id = t.template_id;
            (Some(t), id, v, r)
        }
        Err(err) => {
            // Unreadable: invalid if it names its template (its quotes must never be paid).
            let Some(id) = e.fields.get("template_id").and_then(|t| t.parse().ok()) else {
                tracing::error!(entry = %e.id, "audit task without a template id, dropped: {err}");
                redis::cmd("XACK")
                    .arg(AUDIT_TASKS_STREAM)
                    .arg(GROUP)
                    .arg(&e.id)
                    .query_async::<u64>(conn)
                    .await?;
                return Ok(());
            };
            (
                None,
                id,
                Verdict::Invalid,
                format!("unreadable-task: {err}"),
            )
        }
    };
    let result = AuditResult {
        template_id,
        verdict,
        reason,
        audited_at: now_ms(),
    };
    let (wrote, dropped) = write_verdict(conn, &e.id, task.as_ref(), &result, dead_max).await?;
    if dropped > 0 {
        metrics.dead_letters_dropped.inc_by(dropped);
        tracing::warn!("{AUDIT_DEAD_STREAM} is full (streams.dead_letters_max = {dead_max}): its {dropped} oldest entries went");
    }
    metrics
        .audit_seconds
        .observe(started.elapsed().as_secs_f64());
    if wrote {
        metrics
            .verdicts
            .with_label_values(&[verdict.as_str()])
            .inc();
        if result.reason.contains("after rewinding") {
            metrics.rewound.inc();
        }
        if result.reason.starts_with(UNKNOWN_PARENT) {
            metrics.unknown_parent.inc();
        }
        tracing::info!(
            template = template_id,
            verdict = verdict.as_str(),
            reason = %result.reason,
            "template audited"
        );
    } else {
        tracing::info!(
            template = template_id,
            "verdict already written by another auditor: task acknowledged"
        );
    }
    Ok(())
}

async fn worker(
    config: AuditorConfig,
    name: String,
    node: Arc<AuditNode>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let timeout = Duration::from_millis(config.redis.append_timeout_ms);
    let mut backoff = Duration::from_millis(100);
    let mut state: Option<(Consumer, redis::aio::MultiplexedConnection)> = None;
    let mut last_reclaim = Instant::now() - RECLAIM_EVERY;
    while !stop.is_cancelled() {
        let result = async {
            if state.is_none() {
                let c =
                    Consumer::join(&config.redis.url, AUDIT_TASKS_STREAM, GROUP, &name, timeout)
                        .await?;
                let w = hashpool_streams::connect(&config.redis.url, timeout).await?;
                state = Some((c, w));
            }
            let Some((c, w)) = state.as_mut() else {
                return Ok(());
            };
            let mut entries = Vec::new();
            if last_reclaim.elapsed() >= RECLAIM_EVERY {
                last_reclaim = Instant::now();
                entries = c
                    .claim_abandoned(Duration::from_millis(config.reclaim_idle_ms), 1)
                    .await?;
                if !entries.is_empty() {
                    tracing::info!(worker = %name, "claimed a task left pending (by a dead auditor, or without a verdict yet)");
                }
            }
            if entries.is_empty() {
                entries = tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    e = c.next(1, BLOCK) => e?,
                };
            }
            if entries.is_empty() {
                metrics.backlog.set(c.backlog().await? as i64);
            }
            for e in &entries {
                handle(&node, w, &metrics, e, config.streams.dead_letters_max).await?;
            }
            anyhow::Ok(())
        }
        .await;
        match result {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                tracing::warn!(worker = %name, "audit failed, the task stays pending; retrying in {backoff:?}: {e:#}");
                state = None;
                tokio::select! {
                    _ = stop.cancelled() => return,
                    // Backoff after bitcoind or Redis failed.
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Trim `audit:tasks` of what group `auditors` (and every reader of `streams.readers`) has
/// acknowledged, until `stop`.
async fn trim_tasks(config: AuditorConfig, metrics: Arc<Metrics>, stop: CancellationToken) {
    let s = &config.streams;
    if s.trim_interval_secs == 0 {
        return;
    }
    let target = hashpool_streams::TrimTarget {
        stream: AUDIT_TASKS_STREAM.into(),
        groups: s.groups(GROUP),
    };
    let schedule = hashpool_streams::TrimSchedule {
        interval: Duration::from_secs(s.trim_interval_secs),
        min_age: Duration::from_secs(s.trim_min_age_secs),
        timeout: Duration::from_millis(config.redis.append_timeout_ms),
        // A task holds its whole block.
        warn_kept: 1_000,
    };
    let report = |_: &str, t: &hashpool_streams::Trimmed| {
        metrics.trimmed.inc_by(t.removed);
        metrics.stream_entries.set(t.kept as i64);
    };
    hashpool_streams::run_trimmer(
        config.redis.url.clone(),
        vec![target],
        schedule,
        report,
        stop.cancelled(),
    )
    .await;
}

async fn metrics_text(State(m): State<Arc<Metrics>>) -> String {
    let mut buf = Vec::new();
    let _ = prometheus::TextEncoder::new().encode(&m.registry.gather(), &mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Run the auditor until `shutdown` resolves.
pub async fn run(config: AuditorConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    config
        .validate()
        .map_err(|e| hashpool_config::role_main::invalid("auditor", e))?;
    let rpc = BitcoinRpc::new(
        &config.bitcoind.rpc_url,
        &config.bitcoind.rpc_user,
        config.bitcoind.rpc_password.expose(),
    )?;
    let mut shutdown = std::pin::pin!(shutdown);
    let node = Arc::new(AuditNode::new(
        rpc,
        Rewind::Allowed,
        Duration::from_millis(config.unknown_parent_wait_ms),
    ));
    if !startup::prepare(&config, &node, &mut shutdown).await? {
        return Ok(());
    }
    let metrics = Arc::new(Metrics::new()?);
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for i in 0..config.workers {
        tasks.push(tokio::spawn(worker(
            config.clone(),
            format!("{}-{i}", config.consumer),
            node.clone(),
            metrics.clone(),
            stop.clone(),
        )));
    }
    tasks.push(tokio::spawn(trim_tasks(
        config.clone(),
        metrics.clone(),
        stop.clone(),
    )));
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/health", get(|| async { "ok" }))
        .with_state(metrics);
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    tracing::info!(
        "auditor listening on http://{} with {} worker(s) as {}",
        listener.local_addr()?,
        config.workers,
        config.consumer
    );
    let server_stop = stop.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { server_stop.cancelled().await })
            .await
    });
    shutdown.await;
    tracing::info!("shutting down");
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let _ = server.await;
    Ok(())
}
