//! Subscription name sets shared between streams.
//!
//! Proxies of one namespace subscribe to the same names: every Envoy sidecar asks for the load
//! assignment of each cluster it got. Kept per stream, 1,000 names cost a hash table and 1,000
//! strings per proxy. A [`Names`] is an immutable sorted set; [`NameSets`] hands out one shared
//! copy per distinct content, so a thousand proxies with the same subscription hold one set.
//! Changing a subscription builds a new set (copy on write); a set no stream holds is freed.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use xxhash_rust::xxh3::Xxh3;

type Set = Arc<[Arc<str>]>;

/// An immutable, sorted set of resource names.
#[derive(Debug, Clone, Default)]
pub struct Names(Option<Set>);

impl Names {
    fn slice(&self) -> &[Arc<str>] {
        self.0.as_deref().unwrap_or(&[])
    }

    /// Number of names.
    pub fn len(&self) -> usize {
        self.slice().len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.slice().is_empty()
    }

    /// The set's own copy of `name`, if it holds it.
    pub fn get(&self, name: &str) -> Option<&Arc<str>> {
        let s = self.slice();
        s.binary_search_by(|n| (**n).cmp(name)).ok().map(|i| &s[i])
    }

    /// Whether the set holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The names, sorted.
    pub fn iter(&self) -> std::slice::Iter<'_, Arc<str>> {
        self.slice().iter()
    }

    /// Bytes this holder pays on its own (the set itself is shared).
    pub fn own_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
    }
}

/// The registry of shared sets.
#[derive(Debug, Default)]
pub struct NameSets {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    sets: HashMap<u64, Vec<Weak<[Arc<str>]>>>,
    /// Entries at the last sweep of dead sets.
    swept_at: usize,
}

fn content_hash(names: &[Arc<str>]) -> u64 {
    let mut h = Xxh3::new();
    for n in names {
        h.update(n.as_bytes());
        h.update(&[0]);
    }
    h.digest()
}

fn same_content(a: &[Arc<str>], b: &[Arc<str>]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| Arc::ptr_eq(x, y) || **x == **y)
}

impl NameSets {
    /// The shared set of these names (any order, duplicates allowed).
    pub fn set(&self, mut names: Vec<Arc<str>>) -> Names {
        names.sort_unstable();
        names.dedup();
        self.intern(names)
    }

    /// `base` with `add` added, then `remove` removed.
    pub fn with(&self, base: &Names, add: &[Arc<str>], remove: &[Arc<str>]) -> Names {
        let unchanged = remove.iter().all(|r| !base.contains(r))
            && add
                .iter()
                .all(|a| base.contains(a) || remove.iter().any(|r| r == a));
        if unchanged {
            return base.clone();
        }
        let mut v: Vec<Arc<str>> = base.iter().cloned().collect();
        v.extend(add.iter().cloned());
        v.sort_unstable();
        v.dedup();
        if !remove.is_empty() {
            let mut gone: Vec<&str> = remove.iter().map(|r| &**r).collect();
            gone.sort_unstable();
            v.retain(|n| gone.binary_search(&&**n).is_err());
        }
        self.intern(v)
    }

    fn intern(&self, sorted: Vec<Arc<str>>) -> Names {
        if sorted.is_empty() {
            return Names(None);
        }
        let hash = content_hash(&sorted);
        let mut inner = self.inner.lock();
        let bucket = inner.sets.entry(hash).or_default();
        bucket.retain(|w| w.strong_count() > 0);
        if let Some(found) = bucket
            .iter()
            .filter_map(Weak::upgrade)
            .find(|s| same_content(s, &sorted))
        {
            return Names(Some(found));
        }
        let set: Set = Arc::from(sorted);
        bucket.push(Arc::downgrade(&set));
        let len = inner.sets.len();
        if len > 64 && len > 2 * inner.swept_at {
            inner.sets.retain(|_, b| {
                b.retain(|w| w.strong_count() > 0);
                !b.is_empty()
            });
            inner.swept_at = inner.sets.len();
        }
        Names(Some(set))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Names {
        /// Whether both are the same shared set (or both empty).
        fn same(&self, other: &Names) -> bool {
            match (&self.0, &other.0) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
        }
    }

    impl NameSets {
        /// Distinct sets alive.
        fn live(&self) -> usize {
            self.inner
                .lock()
                .sets
                .values()
                .flatten()
                .filter(|w| w.strong_count() > 0)
                .count()
        }
    }

    fn v(names: &[&str]) -> Vec<Arc<str>> {
        names.iter().map(|n| Arc::from(*n)).collect()
    }

    #[test]
    fn equal_contents_share_one_set() {
        let sets = NameSets::default();
        let a = sets.set(v(&["b", "a", "c"]));
        let b = sets.set(v(&["c", "b", "a", "a"]));
        assert!(a.same(&b));
        assert_eq!(a.iter().map(|n| &**n).collect::<Vec<_>>(), ["a", "b", "c"]);
        assert!(a.contains("b") && !a.contains("d"));
        assert_eq!(sets.live(), 1);
        let c = sets.set(v(&["a"]));
        assert!(!a.same(&c));
        assert_eq!(sets.live(), 2);
    }

    #[test]
    fn with_adds_then_removes_and_converges() {
        let sets = NameSets::default();
        let a = sets.set(v(&["a", "b"]));
        let b = sets.with(&a, &v(&["c"]), &[]);
        assert_eq!(b.len(), 3);
        let c = sets.with(&b, &[], &v(&["b"]));
        let d = sets.set(v(&["a", "c"]));
        assert!(c.same(&d));
        // Subscribing and unsubscribing the same name in one request leaves it out.
        let e = sets.with(&a, &v(&["x"]), &v(&["x"]));
        assert!(e.same(&a));
        assert!(sets.with(&a, &v(&["a"]), &[]).same(&a));
        assert!(sets.with(&a, &[], &v(&["zz"])).same(&a));
        assert!(sets.with(&a, &[], &v(&["a", "b"])).is_empty());
    }

    #[test]
    fn dropped_sets_are_forgotten() {
        let sets = NameSets::default();
        for i in 0..500 {
            let s = sets.set(v(&[&format!("n{i}")]));
            assert_eq!(s.len(), 1);
        }
        assert_eq!(sets.live(), 0);
        assert!(sets.inner.lock().sets.len() <= 130, "dead sets are swept");
    }
}
