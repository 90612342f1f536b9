//! What every [`Store`] must do, as functions each backend's tests run on a fresh, empty store.

use std::sync::Arc;

use futures::StreamExt;

use super::{Error, Mutation, Store};
use crate::model::{
    AccessToken, Instance, InstanceGroup, InstanceInput, Namespace, NamespaceInput, Service,
    TokenInput,
};

fn namespace(name: &str) -> Namespace {
    NamespaceInput {
        name: Some(name.into()),
        ..Default::default()
    }
    .validate("t")
    .unwrap()
}

fn instance(host: &str, port: i64) -> Instance {
    InstanceInput {
        namespace: Some("shop".into()),
        service: Some("echo".into()),
        host: Some(host.into()),
        port: Some(port),
        ..Default::default()
    }
    .validate("t")
    .unwrap()
}

fn token() -> AccessToken {
    TokenInput {
        name: Some("ci".into()),
        role: Some("admin".into()),
        namespaces: None,
    }
    .validate("hash".into(), "t")
    .unwrap()
}

fn group() -> InstanceGroup {
    InstanceGroup {
        namespace: "shop".into(),
        service: "echo".into(),
        name: "canary".into(),
        labels: Default::default(),
        ctime: "t".into(),
    }
}

fn everything() -> Vec<Mutation> {
    vec![
        Mutation::PutNamespace(namespace("shop")),
        Mutation::PutService(Arc::new(Service::bare("shop", "echo", "t"))),
        Mutation::PutInstance(Arc::new(instance("10.0.0.1", 80))),
        Mutation::PutInstance(Arc::new(instance("10.0.0.2", 80))),
        Mutation::PutGroup(group()),
        Mutation::PutToken(token()),
    ]
}

/// An empty store is at revision 0 and holds nothing; a commit is loaded back whole, at the
/// revision the commit answered, which is later than the one before.
pub async fn commit_and_load(s: &dyn Store) {
    let empty = s.load().await.unwrap();
    assert_eq!(empty.revision, 0);
    assert!(empty.namespaces.is_empty() && empty.services.is_empty() && empty.instances.is_empty());
    let r1 = s.commit(everything(), 0).await.unwrap();
    assert!(r1 > 0);
    let snap = s.load().await.unwrap();
    assert_eq!(snap.revision, r1);
    assert_eq!(snap.namespaces, vec![namespace("shop")]);
    assert_eq!(snap.services, vec![Service::bare("shop", "echo", "t")]);
    let mut hosts: Vec<&str> = snap.instances.iter().map(|i| i.host.as_str()).collect();
    hosts.sort();
    assert_eq!(hosts, ["10.0.0.1", "10.0.0.2"]);
    assert_eq!(snap.groups, vec![group()]);
    assert_eq!(snap.tokens.len(), 1);
    // Deletes and puts of one batch apply in order.
    let gone = instance("10.0.0.1", 80).id;
    let mut moved = instance("10.0.0.2", 80);
    moved.weight = 7;
    let r2 = s
        .commit(
            vec![
                Mutation::DeleteInstance(gone),
                Mutation::PutInstance(Arc::new(moved.clone())),
                Mutation::DeleteGroup {
                    namespace: "shop".into(),
                    service: "echo".into(),
                    name: "canary".into(),
                },
            ],
            r1,
        )
        .await
        .unwrap();
    assert!(r2 > r1);
    let snap = s.load().await.unwrap();
    assert_eq!(snap.revision, r2);
    assert_eq!(snap.instances, vec![moved]);
    assert!(snap.groups.is_empty());
}

/// A commit that expects a revision the store is no longer at writes nothing and says so.
pub async fn a_stale_commit_conflicts_and_writes_nothing(s: &dyn Store) {
    let r1 = s.commit(everything(), 0).await.unwrap();
    let e = s
        .commit(vec![Mutation::DeleteNamespace("shop".into())], 0)
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Conflict { expected: 0, actual } if actual == r1),
        "{e}"
    );
    let snap = s.load().await.unwrap();
    assert_eq!(snap.revision, r1);
    assert_eq!(snap.namespaces.len(), 1);
}

/// A watch from a revision yields every later commit in order, then new ones as they commit.
pub async fn a_watch_replays_from_a_revision_then_follows(s: &dyn Store) {
    let r1 = s
        .commit(vec![Mutation::PutNamespace(namespace("a"))], 0)
        .await
        .unwrap();
    let r2 = s
        .commit(vec![Mutation::PutNamespace(namespace("b"))], r1)
        .await
        .unwrap();
    let mut from_r1 = s.watch(r1).await.unwrap();
    let mut from_0 = s.watch(0).await.unwrap();
    let r3 = s
        .commit(vec![Mutation::DeleteNamespace("a".into())], r2)
        .await
        .unwrap();
    let c = next(&mut from_r1).await;
    assert_eq!(c.revision, r2);
    assert!(matches!(&c.batch[..], [Mutation::PutNamespace(n)] if n.name == "b"));
    let c = next(&mut from_r1).await;
    assert_eq!(c.revision, r3);
    assert!(matches!(&c.batch[..], [Mutation::DeleteNamespace(n)] if n == "a"));
    let revisions = [
        next(&mut from_0).await.revision,
        next(&mut from_0).await.revision,
        next(&mut from_0).await.revision,
    ];
    assert_eq!(revisions, [r1, r2, r3]);
}

/// Runs every conformance check, each on a fresh store from `fresh`.
pub async fn all<S: Store, F: std::future::Future<Output = S>>(fresh: impl Fn() -> F) {
    commit_and_load(&fresh().await).await;
    a_stale_commit_conflicts_and_writes_nothing(&fresh().await).await;
    a_watch_replays_from_a_revision_then_follows(&fresh().await).await;
}

async fn next(w: &mut super::Watch) -> super::Committed {
    tokio::time::timeout(std::time::Duration::from_secs(10), w.next())
        .await
        .expect("a commit within 10 s")
        .expect("the watch goes on")
        .unwrap()
}
