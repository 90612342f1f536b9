//! Replicas of one registry on etcd: who is alive, and which replica decides each instance's
//! heartbeat health.
//!
//! Each replica holds `<prefix>/replicas/<id>` (its id and REST URL) under an etcd lease it keeps
//! alive; a replica that dies loses its key when the lease runs out. Every replica watches those
//! keys, and the owner of an instance is the live replica with the highest hash of (replica id,
//! instance id) (rendezvous hashing: when a replica leaves, only its instances move). A heartbeat
//! that reaches another replica is forwarded to the owner, batched per owner
//! (`POST /internal/v1/heartbeats`); only health transitions are ever written. When the set of
//! replicas changes, the registry gives every instance a fresh grace period
//! ([`crate::registry::Ownership::epoch`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::registry::Ownership;

/// This replica in the cluster.
#[derive(Debug, Clone)]
pub struct Config {
    /// Unique among the live replicas.
    pub id: String,
    /// How the other replicas reach this one's REST API.
    pub url: String,
    /// The membership lease: a dead replica's instances move after at most this long.
    pub lease_ttl: Duration,
    /// Token the forwarded heartbeats carry (REST authentication on: an admin token shared by
    /// the replicas).
    pub token: Option<String>,
}

/// A live replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its id.
    pub id: String,
    /// Its REST URL.
    pub url: String,
}

/// The body of `POST /internal/v1/heartbeats`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Beats {
    /// Instance ids.
    pub ids: Vec<String>,
}

/// Its answer: per id, `null` when recorded, else why not.
#[derive(Debug, Serialize, Deserialize)]
pub struct BeatResults {
    /// In the order of the ids.
    pub results: Vec<Option<String>>,
}

type Pending = (String, oneshot::Sender<Result<(), String>>);

/// Membership and heartbeat ownership.
pub struct Cluster {
    cfg: Config,
    members: RwLock<Vec<Member>>,
    epoch: AtomicU64,
    http: reqwest::Client,
    batchers: Mutex<HashMap<String, mpsc::Sender<Pending>>>,
}

/// Heartbeats forwarded in one request at most.
const BATCH: usize = 512;

fn hash(replica: &str, instance: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(format!("{replica}\0{instance}").as_bytes())
}

/// The owner of `instance` among `members` (None: no member known).
pub fn owner<'a>(members: &'a [Member], instance: &str) -> Option<&'a Member> {
    members
        .iter()
        .max_by_key(|m| (hash(&m.id, instance), &m.id))
}

impl Cluster {
    /// Joins the cluster of `client`'s registry under `prefix` and follows its members until
    /// `stop`.
    pub async fn start(
        client: Client,
        prefix: &str,
        cfg: Config,
        stop: watch::Receiver<bool>,
    ) -> Result<Arc<Cluster>, etcd_client::Error> {
        let c = Arc::new(Cluster {
            cfg,
            members: RwLock::new(Vec::new()),
            epoch: AtomicU64::new(0),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("a client without TLS settings builds"),
            batchers: Mutex::new(HashMap::new()),
        });
        let dir = format!("{prefix}/replicas/");
        let key = format!("{dir}{}", c.cfg.id);
        let value = serde_json::to_vec(&Member {
            id: c.cfg.id.clone(),
            url: c.cfg.url.clone(),
        })
        .expect("a member serializes");
        // Joined before serving: the first listing includes this replica.
        let lease = join(&client, &key, &value, c.cfg.lease_ttl).await?;
        c.relist(&client, &dir).await?;
        tokio::spawn(keep(
            client.clone(),
            key,
            value,
            c.cfg.lease_ttl,
            lease,
            stop.clone(),
        ));
        tokio::spawn(follow(c.clone(), client, dir, stop));
        Ok(c)
    }

    /// The live replicas, by id.
    pub fn members(&self) -> Vec<Member> {
        self.members.read().clone()
    }

    /// This replica's id.
    pub fn id(&self) -> &str {
        &self.cfg.id
    }

    async fn relist(&self, client: &Client, dir: &str) -> Result<i64, etcd_client::Error> {
        let r = client
            .kv_client()
            .get(dir, Some(GetOptions::new().with_prefix()))
            .await?;
        let mut members: Vec<Member> = r
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
            .collect();
        members.sort_by(|a, b| a.id.cmp(&b.id));
        let changed = {
            let mut cur = self.members.write();
            let changed = *cur != members;
            *cur = members;
            changed
        };
        if changed {
            let e = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
            tracing::info!(members = ?self.members(), epoch = e, "replicas");
        }
        Ok(r.header().map_or(0, |h| h.revision()))
    }

    /// The queue of heartbeats for the replica at `url`, with its sender task.
    fn batcher(self: &Arc<Self>, url: &str) -> mpsc::Sender<Pending> {
        let mut b = self.batchers.lock();
        if let Some(tx) = b.get(url).filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(65_536);
        tokio::spawn(send_batches(self.clone(), url.to_string(), rx));
        b.insert(url.to_string(), tx.clone());
        tx
    }
}

#[async_trait::async_trait]
impl Ownership for Arc<Cluster> {
    fn owns(&self, id: &str) -> bool {
        // No member known (etcd unreachable at the start): decide rather than leave it undecided.
        owner(&self.members.read(), id).is_none_or(|m| m.id == self.cfg.id)
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    async fn forward(&self, id: &str) -> Result<(), String> {
        let url = match owner(&self.members.read(), id) {
            Some(m) if m.id != self.cfg.id => m.url.clone(),
            _ => return Err("this replica owns it now".into()),
        };
        let (tx, rx) = oneshot::channel();
        self.batcher(&url)
            .send((id.to_string(), tx))
            .await
            .map_err(|_| "forwarder stopped".to_string())?;
        rx.await.map_err(|_| "forwarder stopped".to_string())?
    }
}

/// Sends queued heartbeats for one owner, as many per request as are waiting (up to [`BATCH`]).
async fn send_batches(c: Arc<Cluster>, url: String, mut rx: mpsc::Receiver<Pending>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let body = Beats {
            ids: batch.iter().map(|(id, _)| id.clone()).collect(),
        };
        let mut rq = c
            .http
            .post(format!("{url}/internal/v1/heartbeats"))
            .json(&body);
        if let Some(t) = &c.cfg.token {
            rq = rq.header("X-Polaris-Token", t);
        }
        let answer: Result<BeatResults, String> = async {
            let r = rq.send().await.map_err(|e| e.to_string())?;
            if !r.status().is_success() {
                return Err(format!("{url} answered {}", r.status()));
            }
            r.json().await.map_err(|e| e.to_string())
        }
        .await;
        match answer {
            Ok(a) => {
                for ((_, reply), r) in batch.into_iter().zip(a.results) {
                    let _ = reply.send(match r {
                        None => Ok(()),
                        Some(e) => Err(e),
                    });
                }
            }
            Err(e) => {
                for (_, reply) in batch {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

async fn join(
    client: &Client,
    key: &str,
    value: &[u8],
    ttl: Duration,
) -> Result<i64, etcd_client::Error> {
    let lease = client
        .lease_client()
        .grant(ttl.as_secs().max(1) as i64, None)
        .await?
        .id();
    client
        .kv_client()
        .put(key, value, Some(PutOptions::new().with_lease(lease)))
        .await?;
    Ok(lease)
}

/// Keeps this replica's key alive; joins again after losing the lease (etcd unreachable longer
/// than the TTL). Revokes it at the stop, so the others take over at once.
async fn keep(
    client: Client,
    key: String,
    value: Vec<u8>,
    ttl: Duration,
    mut lease: i64,
    mut stop: watch::Receiver<bool>,
) {
    let every = ttl / 3;
    loop {
        let kept = async {
            let (mut keeper, mut stream) = client.lease_client().keep_alive(lease).await?;
            loop {
                keeper.keep_alive().await?;
                match stream.message().await? {
                    Some(r) if r.ttl() > 0 => {}
                    _ => return Ok::<(), etcd_client::Error>(()),
                }
                tokio::time::sleep(every).await;
            }
        };
        tokio::select! {
            _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                let _ = client.lease_client().revoke(lease).await;
                return;
            }
            r = kept => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "cluster membership lease lost; joining again");
                }
            }
        }
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            match join(&client, &key, &value, ttl).await {
                Ok(l) => {
                    lease = l;
                    break;
                }
                Err(e) => tracing::warn!(error = %e, "cannot join the cluster; retrying"),
            }
            if *stop.borrow() {
                return;
            }
        }
    }
}

/// Follows the members: a watch of the replicas' keys; any change relists them.
async fn follow(c: Arc<Cluster>, client: Client, dir: String, mut stop: watch::Receiver<bool>) {
    loop {
        let rev = match c.relist(&client, &dir).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the replicas; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let watched = async {
            let mut w = client
                .watch_client()
                .watch(
                    dir.as_str(),
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(rev + 1),
                    ),
                )
                .await?;
            while let Some(r) = w.message().await? {
                if r.events()
                    .iter()
                    .any(|e| matches!(e.event_type(), EventType::Put | EventType::Delete))
                {
                    c.relist(&client, &dir).await?;
                }
                if r.canceled() {
                    break;
                }
            }
            Ok::<(), etcd_client::Error>(())
        };
        tokio::select! {
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
            r = watched => if let Err(e) = r {
                tracing::warn!(error = %e, "the replicas' watch failed; resuming");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// `GET /debug/cluster`: this replica, the live replicas with the heartbeat instances each owns,
/// the membership epoch and the registry revision this replica has applied.
pub fn routes<S: Clone + Send + Sync + 'static>(
    cluster: Arc<Cluster>,
    registry: crate::registry::Registry,
) -> axum::Router<S> {
    axum::Router::new().route(
        "/debug/cluster",
        axum::routing::get(move || {
            let (cluster, registry) = (cluster.clone(), registry.clone());
            async move {
                let members = cluster.members();
                let mut owned: HashMap<&str, usize> = HashMap::new();
                for id in registry.heartbeat_ids() {
                    if let Some(m) = owner(&members, &id) {
                        *owned.entry(m.id.as_str()).or_default() += 1;
                    }
                }
                let replicas: Vec<serde_json::Value> = members
                    .iter()
                    .map(|m| {
                        serde_json::json!({
                            "id": m.id,
                            "url": m.url,
                            "heartbeatInstances": owned.get(m.id.as_str()).copied().unwrap_or(0),
                        })
                    })
                    .collect();
                axum::Json(serde_json::json!({
                    "replica": cluster.id(),
                    "epoch": cluster.epoch.load(Ordering::Acquire),
                    "revision": *registry.revision().borrow(),
                    "storeError": *registry.store_health().borrow(),
                    "replicas": replicas,
                }))
            }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str) -> Member {
        Member {
            id: id.into(),
            url: format!("http://{id}"),
        }
    }

    #[test]
    fn a_leaving_replica_moves_only_its_own_instances() {
        let three = [m("a"), m("b"), m("c")];
        let two = [m("a"), m("c")];
        let ids: Vec<String> = (0..3000).map(|i| format!("instance-{i}")).collect();
        let mut per = HashMap::new();
        for id in &ids {
            let before = owner(&three, id).unwrap();
            *per.entry(before.id.clone()).or_insert(0) += 1;
            let after = owner(&two, id).unwrap();
            if before.id != "b" {
                assert_eq!(before, after, "{id} moved though its owner stayed");
            } else {
                assert_ne!(after.id, "b");
            }
        }
        // Spread evenly enough: each of three owns a fair share.
        for (id, n) in per {
            assert!((800..1200).contains(&n), "{id} owns {n} of 3000");
        }
        assert!(owner(&[], "x").is_none());
    }
}
