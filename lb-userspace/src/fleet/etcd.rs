//! The etcd side of fleet configuration: one consistent read of the VIP
//! keys, then a watch from the next revision. Every watch response (all
//! events of one revision, or of several) becomes one whole snapshot, so
//! the daemon applies each revision as one reconcile, never half of one.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::mpsc;

use super::{Entry, EtcdConfig, Snapshot};

/// What the follower tells the daemon.
#[derive(Debug)]
pub enum FleetEvent {
    /// The VIP keys at a revision.
    Snapshot(Snapshot),
    /// etcd answers (after a start or an outage).
    Connected,
    /// etcd does not answer: the last applied revision keeps serving.
    Lost(String),
    /// Fleet health: what the live instances see down.
    Health(super::health::HealthView),
    /// Fleet health unavailable (etcd unreachable): decide alone.
    HealthLost(String),
}

fn timeout(cfg: &EtcdConfig) -> Duration {
    Duration::from_millis(cfg.timeout_ms)
}

/// Runs `f` within the configured timeout.
pub(crate) async fn within<T>(
    cfg: &EtcdConfig,
    what: &str,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T> {
    tokio::time::timeout(timeout(cfg), f)
        .await
        .map_err(|_| anyhow!("{what}: no answer from etcd within {} ms", cfg.timeout_ms))?
        .with_context(|| what.to_string())
}

pub async fn connect(cfg: &EtcdConfig) -> Result<Client> {
    // Keepalives find a dead etcd (or path) under an idle watch.
    let options = ConnectOptions::new()
        .with_connect_timeout(timeout(cfg))
        .with_keep_alive(Duration::from_secs(1), timeout(cfg))
        .with_keep_alive_while_idle(true);
    within(
        cfg,
        &format!("connecting to etcd {}", cfg.endpoints.join(", ")),
        Client::connect(&cfg.endpoints, Some(options)),
    )
    .await
}

/// The VIP keys at the store's current revision, and that revision (the
/// snapshot's own is that of the newest change to the VIP keys, the same
/// on every instance whatever else the store holds).
pub async fn read(cfg: &EtcdConfig, client: &mut Client) -> Result<(Snapshot, i64)> {
    let resp = within(
        cfg,
        "reading the VIP keys",
        client.get(cfg.vips_prefix(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let revision = resp
        .header()
        .map(|h| h.revision())
        .ok_or_else(|| anyhow!("etcd answered without a revision"))?;
    let mut entries = std::collections::BTreeMap::new();
    for kv in resp.kvs() {
        entries.insert(
            kv.key_str()?.to_string(),
            Entry {
                value: kv.value_str()?.to_string(),
                mod_revision: kv.mod_revision(),
            },
        );
    }
    let newest = entries.values().map(|e| e.mod_revision).max().unwrap_or(0);
    Ok((
        Snapshot {
            revision: newest,
            entries,
        },
        revision,
    ))
}

/// Connects and reads once (lbd's start).
pub async fn read_once(cfg: &EtcdConfig) -> Result<Snapshot> {
    let mut client = connect(cfg).await?;
    Ok(read(cfg, &mut client).await?.0)
}

/// Follows the VIP keys for as long as lbd runs: a snapshot at every
/// revision that touches them; `Lost` and a new read after any failure
/// (etcd down, partition, compaction past our revision).
pub async fn follow(cfg: EtcdConfig, tx: mpsc::UnboundedSender<FleetEvent>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = std::time::Instant::now();
        let err = match session(&cfg, &tx).await {
            Ok(()) => anyhow!("watch ended"),
            Err(e) => e,
        };
        if tx.send(FleetEvent::Lost(format!("{err:#}"))).is_err() {
            return;
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn session(cfg: &EtcdConfig, tx: &mpsc::UnboundedSender<FleetEvent>) -> Result<()> {
    let mut client = connect(cfg).await?;
    let (mut snap, store_revision) = read(cfg, &mut client).await?;
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(store_revision + 1);
    let mut stream = within(
        cfg,
        "watching the VIP keys",
        client.watch(cfg.vips_prefix(), Some(options)),
    )
    .await?;
    let _ = tx.send(FleetEvent::Snapshot(snap.clone()));
    let _ = tx.send(FleetEvent::Connected);
    loop {
        let Some(resp) = stream.message().await.context("watch")? else {
            bail!("etcd closed the watch");
        };
        if resp.canceled() {
            bail!(
                "etcd canceled the watch ({}; compacted at {}): reading again",
                resp.cancel_reason(),
                resp.compact_revision()
            );
        }
        if resp.events().is_empty() {
            continue;
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let key = kv.key_str()?.to_string();
            match ev.event_type() {
                EventType::Put => {
                    snap.entries.insert(
                        key,
                        Entry {
                            value: kv.value_str()?.to_string(),
                            mod_revision: kv.mod_revision(),
                        },
                    );
                }
                EventType::Delete => {
                    snap.entries.remove(&key);
                }
            }
            snap.revision = snap.revision.max(kv.mod_revision());
        }
        if tx.send(FleetEvent::Snapshot(snap.clone())).is_err() {
            return Ok(());
        }
    }
}

/// A change of one VIP key, made only if the key is still at `expected`
/// (its mod revision as this instance applied it; 0: must not exist).
#[derive(Clone, Debug)]
pub struct Write {
    pub key: String,
    /// `None` deletes the key.
    pub value: Option<String>,
    pub expected: i64,
}

/// Makes `w` in one transaction; the revision it created.
pub async fn write(cfg: &EtcdConfig, w: Write) -> Result<i64> {
    let mut client = connect(cfg).await?;
    let op = match &w.value {
        Some(v) => TxnOp::put(w.key.clone(), v.clone(), None),
        None => TxnOp::delete(w.key.clone(), None),
    };
    let txn = Txn::new()
        .when([Compare::mod_revision(
            w.key.clone(),
            CompareOp::Equal,
            w.expected,
        )])
        .and_then([op]);
    let what = format!("writing {} to etcd {}", w.key, cfg.endpoints.join(", "));
    let resp = within(cfg, &what, client.txn(txn)).await?;
    if !resp.succeeded() {
        bail!(
            "{} changed in etcd after revision {} (another operator or instance): nothing written; \
             `lbctl status` shows the revision now applied; retry",
            w.key,
            w.expected
        );
    }
    resp.header()
        .map(|h| h.revision())
        .ok_or_else(|| anyhow!("etcd answered without a revision"))
}
