//! Partition leases of stream consumer groups, shared by both engines.
//!
//! The engines only store a group's members and per-partition lease
//! records atomically; the policy lives here. Every live member gets a
//! target share of the partitions (the first `partitions % members` by name
//! get one extra), takes free or expired partitions up to it, gives back
//! what is over it, and steals from members above their own share. Tokens
//! increase on every change of owner, so a consumer that lost a partition
//! cannot checkpoint it any more (fencing).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::Lease;

/// One partition's lease as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LeaseState {
    pub owner: String,
    pub token: u64,
    pub expires_ms: u64,
    /// 0: no checkpoint yet (sequences start at 1).
    pub checkpoint: u64,
}

impl LeaseState {
    pub fn live(&self, now: u64) -> bool {
        !self.owner.is_empty() && self.expires_ms >= now
    }
}

/// Heartbeats `consumer` into the group: updates `members` (name → expiry)
/// and `leases`, returning the consumer's leases and which partitions
/// changed.
pub(crate) fn acquire(
    members: &mut BTreeMap<String, u64>,
    leases: &mut [LeaseState],
    consumer: &str,
    now: u64,
    ttl_ms: u64,
) -> (Vec<Lease>, Vec<bool>) {
    members.insert(consumer.to_owned(), now + ttl_ms);
    members.retain(|_, exp| *exp >= now);
    let names: Vec<&String> = members.keys().collect();
    let partitions = leases.len();
    let target_of = |name: &str| -> usize {
        let n = names.len().max(1);
        let rank = names.iter().position(|m| *m == name).unwrap_or(n);
        partitions / n + usize::from(rank < partitions % n)
    };
    let mut changed = vec![false; partitions];
    let target = target_of(consumer);
    let mut mine: Vec<usize> = (0..partitions)
        .filter(|&p| leases[p].owner == consumer && leases[p].live(now))
        .collect();
    while mine.len() > target {
        if let Some(p) = mine.pop() {
            leases[p].owner.clear();
            leases[p].expires_ms = 0;
            changed[p] = true;
        }
    }
    for &p in &mine {
        leases[p].expires_ms = now + ttl_ms;
        changed[p] = true;
    }
    let mut take = |p: usize, leases: &mut [LeaseState], mine: &mut Vec<usize>| {
        leases[p].owner = consumer.to_owned();
        leases[p].token += 1;
        leases[p].expires_ms = now + ttl_ms;
        changed[p] = true;
        mine.push(p);
    };
    for p in 0..partitions {
        if mine.len() >= target {
            break;
        }
        if !leases[p].live(now) {
            take(p, leases, &mut mine);
        }
    }
    if mine.len() < target {
        let mut held: HashMap<String, usize> = HashMap::new();
        for l in leases.iter().filter(|l| l.live(now)) {
            *held.entry(l.owner.clone()).or_default() += 1;
        }
        for p in 0..partitions {
            if mine.len() >= target {
                break;
            }
            let owner = leases[p].owner.clone();
            if owner == consumer || !leases[p].live(now) {
                continue;
            }
            let n = held.get(&owner).copied().unwrap_or(0);
            if n > target_of(&owner) {
                held.insert(owner, n - 1);
                take(p, leases, &mut mine);
            }
        }
    }
    mine.sort_unstable();
    let out = mine
        .into_iter()
        .map(|p| Lease {
            partition: p as u32,
            token: leases[p].token,
            checkpoint: (leases[p].checkpoint > 0).then_some(leases[p].checkpoint),
        })
        .collect();
    (out, changed)
}

/// Records a checkpoint if `consumer` holds the lease with `token`.
pub(crate) fn checkpoint(
    lease: &mut LeaseState,
    consumer: &str,
    token: u64,
    sequence: u64,
    now: u64,
) -> bool {
    if lease.owner != consumer || lease.token != token || !lease.live(now) {
        return false;
    }
    lease.checkpoint = sequence;
    true
}

/// Removes `consumer` from the group and frees its leases.
pub(crate) fn leave(
    members: &mut BTreeMap<String, u64>,
    leases: &mut [LeaseState],
    consumer: &str,
) {
    members.remove(consumer);
    for l in leases.iter_mut().filter(|l| l.owner == consumer) {
        l.owner.clear();
        l.expires_ms = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(leases: &[LeaseState]) -> Vec<&str> {
        leases.iter().map(|l| l.owner.as_str()).collect()
    }

    #[test]
    fn members_split_then_take_over() {
        let mut members = BTreeMap::new();
        let mut leases = vec![LeaseState::default(); 5];
        let (a, _) = acquire(&mut members, &mut leases, "a", 0, 100);
        assert_eq!(a.len(), 5);
        let (b, _) = acquire(&mut members, &mut leases, "b", 10, 100);
        assert_eq!(b.len(), 2, "{:?}", owners(&leases));
        let (a, _) = acquire(&mut members, &mut leases, "a", 20, 100);
        assert_eq!(a.len(), 3);
        // a stops heartbeating; b takes over after a's expiry.
        let (b, _) = acquire(&mut members, &mut leases, "b", 200, 100);
        assert_eq!(b.len(), 5);
        assert!(!checkpoint(&mut leases[0], "a", a[0].token, 9, 200));
        assert!(checkpoint(&mut leases[0], "b", b[0].token, 9, 200));
        leave(&mut members, &mut leases, "b");
        assert!(leases.iter().all(|l| !l.live(200)));
    }
}
