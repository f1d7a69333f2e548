//! Fleet health (`[etcd] health = "fleet"`): instances publish what their
//! own checks see down, and a backend leaves the tables when `down_share`
//! of the live instances see it down, so one instance's view of a fault
//! (its own path to a backend broken) no longer makes its table differ.
//!
//! Keys, all on the instance's lease (gone when the instance is):
//! `<prefix>instances/<instance>` and, for each backend it sees down,
//! `<prefix>health/<instance>/<VIP name>/<backend address>`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use etcd_client::{Client, DeleteOptions, EventType, GetOptions, PutOptions, WatchOptions};
use tokio::sync::{mpsc, watch};

use super::{
    EtcdConfig,
    etcd::{FleetEvent, within},
};

/// A backend of a VIP (by the VIP's name) as one instance sees it: down.
pub type Observation = (String, IpAddr);

/// What the fleet sees: the live instances and each one's observations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthView {
    pub live: BTreeSet<String>,
    pub down: BTreeMap<String, BTreeSet<Observation>>,
}

/// Instances that must see a backend down for it to leave the tables.
pub fn quorum(live: usize, share: f64) -> usize {
    ((live as f64 * share).ceil() as usize).max(1)
}

impl HealthView {
    /// Backends out of every table: seen down by a quorum of live instances.
    pub fn decided_down(&self, share: f64) -> BTreeSet<Observation> {
        let need = quorum(self.live.len(), share);
        let mut seen: BTreeMap<&Observation, usize> = BTreeMap::new();
        for (instance, down) in &self.down {
            if self.live.contains(instance) {
                for o in down {
                    *seen.entry(o).or_default() += 1;
                }
            }
        }
        seen.into_iter()
            .filter(|(_, n)| *n >= need)
            .map(|(o, _)| o.clone())
            .collect()
    }

    /// How many live instances see `o` down.
    pub fn seen_down_by(&self, o: &Observation) -> usize {
        self.down
            .iter()
            .filter(|(i, d)| self.live.contains(*i) && d.contains(o))
            .count()
    }

    fn apply(&mut self, cfg: &EtcdConfig, key: &str, put: bool) {
        if let Some(instance) = key.strip_prefix(&instances_prefix(cfg)) {
            if put {
                self.live.insert(instance.to_string());
            } else {
                self.live.remove(instance);
            }
        } else if let Some((instance, o)) = parse_observation_key(cfg, key) {
            let set = self.down.entry(instance).or_default();
            if put {
                set.insert(o);
            } else {
                set.remove(&o);
            }
        }
    }
}

fn health_prefix(cfg: &EtcdConfig) -> String {
    format!("{}health/", cfg.prefix)
}

fn instances_prefix(cfg: &EtcdConfig) -> String {
    format!("{}instances/", cfg.prefix)
}

pub fn observation_key(cfg: &EtcdConfig, instance: &str, o: &Observation) -> String {
    format!("{}{instance}/{}/{}", health_prefix(cfg), o.0, o.1)
}

/// (instance, observation) of an observation key.
pub fn parse_observation_key(cfg: &EtcdConfig, key: &str) -> Option<(String, Observation)> {
    let rest = key.strip_prefix(&health_prefix(cfg))?;
    let (instance, rest) = rest.split_once('/')?;
    let (vip, backend) = rest.rsplit_once('/')?;
    Some((instance.into(), (vip.into(), backend.parse().ok()?)))
}

/// How long an instance's keys outlive it (its lease).
const LEASE_TTL_SECS: i64 = 5;

/// Publishes this instance's observations (`local`: the whole set, as the
/// daemon's checks have it) and reports the fleet's view, for as long as
/// lbd runs; `HealthLost` after any failure (the daemon then decides alone).
pub async fn run(
    cfg: EtcdConfig,
    mut local: watch::Receiver<BTreeSet<Observation>>,
    tx: mpsc::UnboundedSender<FleetEvent>,
) {
    loop {
        let err = session(&cfg, &mut local, &tx)
            .await
            .err()
            .unwrap_or_else(|| anyhow!("ended"));
        if tx.send(FleetEvent::HealthLost(format!("{err:#}"))).is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Brings this instance's observation keys to `want`.
async fn publish(
    cfg: &EtcdConfig,
    client: &mut Client,
    me: &str,
    lease: i64,
    published: &mut BTreeSet<Observation>,
    want: &BTreeSet<Observation>,
) -> Result<()> {
    for o in want.difference(&published.clone()) {
        let key = observation_key(cfg, me, o);
        within(
            cfg,
            "publishing an observation",
            client.put(key, "down", Some(PutOptions::new().with_lease(lease))),
        )
        .await?;
        published.insert(o.clone());
    }
    for o in published.clone().difference(want) {
        let key = observation_key(cfg, me, o);
        within(cfg, "withdrawing an observation", client.delete(key, None)).await?;
        published.remove(o);
    }
    Ok(())
}

async fn session(
    cfg: &EtcdConfig,
    local: &mut watch::Receiver<BTreeSet<Observation>>,
    tx: &mpsc::UnboundedSender<FleetEvent>,
) -> Result<()> {
    let me = cfg.instance_name();
    let mut client = super::etcd::connect(cfg).await?;
    let lease = within(
        cfg,
        "granting a lease",
        client.lease_grant(LEASE_TTL_SECS, None),
    )
    .await?
    .id();
    let (mut keeper, mut renewals) =
        within(cfg, "keeping the lease", client.lease_keep_alive(lease)).await?;
    // A previous run's observations go; ours are published afresh.
    let own = format!("{}{me}/", health_prefix(cfg));
    within(
        cfg,
        "clearing old observations",
        client.delete(own, Some(DeleteOptions::new().with_prefix())),
    )
    .await?;
    within(
        cfg,
        "registering the instance",
        client.put(
            format!("{}{me}", instances_prefix(cfg)),
            "",
            Some(PutOptions::new().with_lease(lease)),
        ),
    )
    .await?;
    let mut published = BTreeSet::new();
    let want = local.borrow_and_update().clone();
    publish(cfg, &mut client, &me, lease, &mut published, &want).await?;
    // The view at one revision, then every change after it.
    let mut view = HealthView::default();
    let mut revision = 0;
    for prefix in [instances_prefix(cfg), health_prefix(cfg)] {
        let resp = within(
            cfg,
            "reading the fleet's health",
            client.get(
                prefix,
                Some(GetOptions::new().with_prefix().with_keys_only()),
            ),
        )
        .await?;
        revision = revision.max(resp.header().map_or(0, |h| h.revision()));
        for kv in resp.kvs() {
            view.apply(cfg, kv.key_str()?, true);
        }
    }
    let mut watches = Vec::new();
    for prefix in [instances_prefix(cfg), health_prefix(cfg)] {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        watches.push(
            within(
                cfg,
                "watching the fleet's health",
                client.watch(prefix, Some(options)),
            )
            .await?,
        );
    }
    let [mut instances, mut health] =
        <[_; 2]>::try_from(watches).map_err(|_| anyhow!("two watches"))?;
    let _ = tx.send(FleetEvent::Health(view.clone()));
    let mut renew = tokio::time::interval(Duration::from_secs(1));
    loop {
        let resp = tokio::select! {
            _ = renew.tick() => {
                keeper.keep_alive().await.context("renewing the lease")?;
                continue;
            }
            r = renewals.message() => {
                match r.context("lease renewals")? {
                    Some(r) if r.ttl() > 0 => continue,
                    _ => bail!("the lease expired"),
                }
            }
            changed = local.changed() => {
                changed.context("lbd stopping")?;
                let want = local.borrow_and_update().clone();
                publish(cfg, &mut client, &me, lease, &mut published, &want).await?;
                continue;
            }
            r = instances.message() => r,
            r = health.message() => r,
        };
        let Some(resp) = resp.context("watch")? else {
            bail!("etcd closed a watch");
        };
        if resp.canceled() {
            bail!("etcd canceled a watch ({})", resp.cancel_reason());
        }
        for ev in resp.events() {
            if let Some(kv) = ev.kv() {
                view.apply(cfg, kv.key_str()?, ev.event_type() == EventType::Put);
            }
        }
        if !resp.events().is_empty() && tx.send(FleetEvent::Health(view.clone())).is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> EtcdConfig {
        toml::from_str("endpoints = [\"http://127.0.0.1:2379\"]").unwrap()
    }

    fn obs(vip: &str, b: &str) -> Observation {
        (vip.into(), b.parse().unwrap())
    }

    #[test]
    fn keys_name_instance_vip_and_backend() {
        let c = cfg();
        let o = obs("[fd00::10]:80/tcp", "fd00:30:1::2");
        let key = observation_key(&c, "lb1", &o);
        assert_eq!(key, "/lbd/health/lb1/[fd00::10]:80/tcp/fd00:30:1::2");
        assert_eq!(parse_observation_key(&c, &key), Some(("lb1".into(), o)));
        assert_eq!(parse_observation_key(&c, "/lbd/health/lb1/x"), None);
    }

    #[test]
    fn a_backend_leaves_when_a_share_of_live_instances_sees_it_down() {
        let c = cfg();
        let mut v = HealthView::default();
        for i in ["lb1", "lb2", "lb3"] {
            v.apply(&c, &format!("/lbd/instances/{i}"), true);
        }
        let be = obs("10.0.0.10:80/tcp", "10.30.3.2");
        v.apply(&c, &observation_key(&c, "lb1", &be), true);
        // One of three: a fault on lb1's path only.
        assert!(v.decided_down(0.5).is_empty());
        v.apply(&c, &observation_key(&c, "lb2", &be), true);
        assert_eq!(v.decided_down(0.5), BTreeSet::from([be.clone()]));
        assert_eq!(v.seen_down_by(&be), 2);
        // An instance that is gone does not count.
        v.apply(&c, "/lbd/instances/lb2", false);
        v.apply(&c, "/lbd/instances/lb3", false);
        assert_eq!(
            v.decided_down(0.5),
            BTreeSet::from([be.clone()]),
            "1 of 1 live"
        );
        v.apply(&c, "/lbd/instances/lb3", true);
        assert_eq!(v.decided_down(0.5).len(), 1, "1 of 2 live: 0.5 needs 1");
        assert!(v.decided_down(0.6).is_empty(), "0.6 of 2 needs 2");
        assert_eq!(quorum(2, 0.5), 1);
        assert_eq!(quorum(3, 0.5), 2);
        assert_eq!(quorum(3, 1.0), 3);
        assert_eq!(quorum(0, 0.5), 1);
    }
}
