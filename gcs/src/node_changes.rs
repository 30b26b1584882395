//! The log of node-row changes that views of the cluster read by delta, and the samples
//! of the table that node daemons keep on a large cluster (bounded views).
//!
//! A node keeps a view of the cluster for spillback. Whole views cost the head the square
//! of the cluster: each change of a node's free resources goes to every node, and a node
//! joining reads every row. Past twice `view_sample` rows, a node asking for a sampled
//! view is sent only the rows of its own hash bucket: the table is split into 2^level
//! buckets by a keyed hash of the node id (keyed per head process, so nobody chooses
//! their bucket), with the level such that a bucket holds `view_sample` to twice that.
//! Each bucket has a log of its own and a set of its nodes, so a reader's delta costs what
//! changed in its bucket, and a whole read its bucket's rows, not the cluster's. What a
//! sample misses the node asks of the head.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;

use ionet_common::ids::NodeId;

/// How many changes of node rows are remembered for readers of deltas (a reader further
/// behind reads the whole table).
pub(crate) const NODE_CHANGES_KEPT: usize = 1 << 16;
/// Changes each bucket's log remembers at least (a reader further behind reads its
/// sample whole); past 128 buckets, all of them remember `2 × NODE_CHANGES_KEPT` in all.
const BUCKET_CHANGES_KEPT: usize = 256;
/// Most buckets: 2^20, a million buckets of `view_sample` nodes.
const MAX_LEVEL: u32 = 20;

/// Which bucket a node is in at a level: the top `level` bits of a keyed hash of its id.
#[derive(Clone)]
pub(crate) struct Sampler {
    hasher: std::collections::hash_map::RandomState,
    level: u32,
}

impl Sampler {
    pub(crate) fn bucket(&self, node: &NodeId) -> usize {
        if self.level == 0 {
            return 0;
        }
        (self.hasher.hash_one(node.as_bytes()) >> (64 - self.level)) as usize
    }

    /// Whether samples are taken (the table is large enough): else every view is whole.
    pub(crate) fn samples(&self) -> bool {
        self.level > 0
    }
}

#[derive(Default)]
struct BucketLog {
    log: VecDeque<(u64, NodeId)>,
    /// A reader at this version or later is answered from `log`.
    complete_from: u64,
}

/// The node rows changed, in order: what a node refreshing its view asks for instead of
/// the whole table (which, read by every node every second, costs the head the square
/// of the cluster's size).
pub(crate) struct NodeChanges {
    /// The latest change's number (this process's: a reader of another incarnation reads
    /// the whole table).
    pub(crate) version: u64,
    log: VecDeque<(u64, NodeId)>,
    /// Each node's latest change: what its row in `GcsState::encoded_rows` must be of.
    pub(crate) latest: HashMap<NodeId, u64>,
    /// Rows a sampled view aims at (0: views are whole).
    sample_size: usize,
    sampler: Sampler,
    /// The version at which the level was last set: a sampled view read before holds
    /// another sample, and is read whole again.
    sampled_since: u64,
    buckets: Vec<BucketLog>,
    /// The nodes of each bucket (every node in `latest`): a sampled view read whole is
    /// its bucket's rows, found without a scan of the table.
    members: Vec<std::collections::HashSet<NodeId>>,
}

impl NodeChanges {
    pub(crate) fn new(sample_size: usize) -> Self {
        Self {
            version: 0,
            log: VecDeque::new(),
            latest: HashMap::new(),
            sample_size,
            sampler: Sampler { hasher: Default::default(), level: 0 },
            sampled_since: 0,
            buckets: vec![BucketLog::default()],
            members: vec![Default::default()],
        }
    }

    /// Logs a change of `node`'s row.
    pub(crate) fn changed(&mut self, node: NodeId) {
        self.version += 1;
        let version = self.version;
        self.log.push_back((version, node));
        let new = self.latest.insert(node, version).is_none();
        if self.log.len() > NODE_CHANGES_KEPT {
            self.log.pop_front();
        }
        if self.sampler.samples() {
            let kept = BUCKET_CHANGES_KEPT.max((2 * NODE_CHANGES_KEPT) >> self.sampler.level);
            let index = self.sampler.bucket(&node);
            if new {
                self.members[index].insert(node);
            }
            let bucket = &mut self.buckets[index];
            bucket.log.push_back((version, node));
            if bucket.log.len() > kept {
                if let Some((dropped, _)) = bucket.log.pop_front() {
                    bucket.complete_from = dropped;
                }
            }
        }
        if new {
            self.resample();
        }
    }

    /// Sets the level for the table as it is now (every row is in `latest`, logged once at
    /// least): up when a bucket would hold twice the sample, down when it would hold under
    /// three quarters of it (so that a table at a boundary does not move every view back
    /// and forth). Every sampled view is read whole again after a move.
    fn resample(&mut self) {
        let rows = self.latest.len();
        let level = level_for(self.sample_size, rows, self.sampler.level);
        if level == self.sampler.level {
            return;
        }
        tracing::info!(rows, level, buckets = 1u64 << level, "node views are sampled at another level");
        // A version of its own: a view read at the last one is of the old level.
        self.version += 1;
        self.sampled_since = self.version;
        self.sampler.level = level;
        self.buckets =
            (0..1usize << level).map(|_| BucketLog { log: VecDeque::new(), complete_from: self.version }).collect();
        self.members = vec![Default::default(); 1usize << level];
        if level > 0 {
            for node in self.latest.keys() {
                self.members[self.sampler.bucket(node)].insert(*node);
            }
        }
    }

    /// Forgets `node` (its row is gone from the table).
    pub(crate) fn forget(&mut self, node: &NodeId) {
        self.latest.remove(node);
        if self.sampler.samples() {
            let index = self.sampler.bucket(node);
            self.members[index].remove(node);
        }
        self.resample();
    }

    /// The nodes of `viewer`'s sample, when views are sampled: its bucket's.
    pub(crate) fn sample_of(&self, viewer: &NodeId) -> Option<Vec<NodeId>> {
        self.sampler.samples().then(|| self.members[self.sampler.bucket(viewer)].iter().copied().collect())
    }

    /// Who is in which bucket now, and whether views are sampled.
    pub(crate) fn sampler(&self) -> &Sampler {
        &self.sampler
    }

    /// The nodes changed since a reader's `since` (of incarnation `since_incarnation`),
    /// each once, when every change since is still remembered; else `None`: the reader
    /// needs every row (of its sample, for a reader keeping one: `viewer`).
    pub(crate) fn since(
        &self,
        since: u64,
        since_incarnation: u64,
        incarnation: u64,
        viewer: Option<&NodeId>,
    ) -> Option<Vec<NodeId>> {
        let current = since > 0 && since_incarnation == incarnation && since <= self.version;
        let (log, complete) = match viewer {
            // A sampled view read before the level last moved holds another sample.
            Some(_) if since < self.sampled_since => return None,
            Some(viewer) if self.sampler.samples() => {
                let bucket = &self.buckets[self.sampler.bucket(viewer)];
                (&bucket.log, since >= bucket.complete_from)
            }
            _ => {
                let complete = self.log.front().map_or(since == self.version, |(oldest, _)| *oldest <= since + 1);
                (&self.log, complete)
            }
        };
        (current && complete).then(|| {
            let start = log.partition_point(|(version, _)| *version <= since);
            let mut changed: Vec<NodeId> = log.range(start..).map(|(_, node)| *node).collect();
            changed.sort_unstable();
            changed.dedup();
            changed
        })
    }
}

/// The level at which a table of `rows` is sampled for views of `size` rows, from
/// `current`.
fn level_for(size: usize, rows: usize, current: u32) -> u32 {
    if size == 0 {
        return 0;
    }
    let (size, rows) = (size as u128, rows as u128);
    let mut level = current;
    while level < MAX_LEVEL && rows >= size << (level + 1) {
        level += 1;
    }
    while level > 0 && rows * 4 < (size << level) * 3 {
        level -= 1;
    }
    level
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_level_keeps_a_bucket_between_three_quarters_of_the_sample_and_twice_it() {
        assert_eq!(level_for(0, 1_000_000, 0), 0, "no sample: whole views");
        assert_eq!(level_for(128, 255, 0), 0);
        assert_eq!(level_for(128, 256, 0), 1);
        assert_eq!(level_for(128, 10_000, 0), 6, "10,000 rows: 64 buckets of 156");
        // Down only below three quarters: a table at a boundary stays where it is.
        assert_eq!(level_for(128, 250, 1), 1);
        assert_eq!(level_for(128, 192, 1), 1);
        assert_eq!(level_for(128, 191, 1), 0);
        assert_eq!(level_for(128, 10, 6), 0);
        assert_eq!(level_for(1, usize::MAX / 4, 0), MAX_LEVEL);
        assert_eq!(level_for(usize::MAX, usize::MAX, 0), 0, "no overflow");
    }

    #[test]
    fn a_sampled_reader_reads_its_own_bucket_and_reads_whole_after_a_move() {
        let mut changes = NodeChanges::new(2);
        let nodes: Vec<NodeId> = (0..64).map(|_| NodeId::random()).collect();
        let incarnation = 7;
        // Under twice the sample's size: one bucket, the whole log.
        for node in &nodes[..3] {
            changes.changed(*node);
        }
        assert_eq!(changes.sampler.level, 0);
        let all = changes.since(1, incarnation, incarnation, Some(&nodes[0])).unwrap();
        assert_eq!(all.len(), 2);
        let before = changes.version;
        // The level follows the table as it grows.
        for node in &nodes[3..] {
            changes.changed(*node);
        }
        let moved = changes.sampled_since;
        assert_eq!(changes.sampler.level, 5, "64 rows in buckets of 2: 32 buckets");
        assert!(changes.since(before, incarnation, incarnation, Some(&nodes[0])).is_none(), "read before the move");
        assert!(changes.since(before, incarnation, incarnation, None).is_some(), "whole views go on by delta");
        for node in &nodes {
            changes.changed(*node);
        }
        let viewer = nodes[0];
        let seen = changes.since(moved, incarnation, incarnation, Some(&viewer)).unwrap();
        let bucket = changes.sampler.bucket(&viewer);
        let expected: Vec<NodeId> = {
            let mut in_bucket: Vec<NodeId> =
                nodes.iter().copied().filter(|node| changes.sampler.bucket(node) == bucket).collect();
            in_bucket.sort_unstable();
            in_bucket
        };
        assert_eq!(seen, expected, "the viewer's bucket, itself included");
        let mut whole = changes.sample_of(&viewer).unwrap();
        whole.sort_unstable();
        assert_eq!(whole, expected, "read whole: the same nodes");
        changes.forget(&viewer);
        assert!(!changes.sample_of(&viewer).unwrap().contains(&viewer) && !changes.latest.contains_key(&viewer));
        assert!(seen.contains(&viewer));
        assert!(seen.len() < nodes.len());
        assert!(changes.since(moved, incarnation ^ 1, incarnation, Some(&viewer)).is_none(), "another incarnation");
        // A bucket's log remembers so much: a reader further behind reads its sample whole.
        let behind = changes.version;
        for _ in 0..=(2 * NODE_CHANGES_KEPT) >> changes.sampler.level {
            changes.changed(viewer);
        }
        assert!(changes.since(behind, incarnation, incarnation, Some(&viewer)).is_none(), "too far behind");
        assert_eq!(changes.since(changes.version - 1, incarnation, incarnation, Some(&viewer)).unwrap(), vec![viewer]);
    }
}
