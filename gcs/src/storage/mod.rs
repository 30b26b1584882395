//! Where the control store keeps its tables: a byte-keyed map per table, behind
//! the [`GcsStorage`] trait.
//!
//! Three backends: [`MemoryStorage`] (lost with the process), [`RedbStorage`], an
//! embedded database file: a head restarted with the same `--storage FILE` finds
//! its tables again, and [`RedisStorage`] (`--storage redis://host:port/db`), the same
//! tables on a Redis server, which a head on another machine can take over. Each call is
//! committed before it returns (the file's calls made at once share one commit), so a
//! crash loses at most the calls in flight. Calls block (file I/O, fsync): the server
//! runs them on tokio's blocking pool, never on a runtime worker.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Condvar, Mutex};

use redb::{ReadableTable, TableDefinition};

use crate::error::{GcsError, GcsResult};

pub mod redis;
pub use self::redis::{is_redis_url, RedisStorage};

/// Where the head keeps its tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StorageLocation {
    /// Lost with the process.
    #[default]
    Memory,
    /// An embedded database file.
    File(std::path::PathBuf),
    /// A Redis server: `redis://[user:password@]host:port/db`.
    Redis(String),
}

impl StorageLocation {
    /// `--storage`'s argument: a Redis URL, else a file.
    pub fn parse(argument: &str) -> Self {
        if is_redis_url(argument) {
            StorageLocation::Redis(argument.to_string())
        } else {
            StorageLocation::File(argument.into())
        }
    }
}

/// The tables of the control store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Nodes,
    Jobs,
    /// Internal KV; keys are `namespace \0 key`.
    Kv,
    /// Counters and identity of the store itself.
    Meta,
    /// Metering: leases still open, keyed by lease id.
    Leases,
    /// Metering: usage records made, keyed by record id.
    Usage,
    /// Actors, keyed by actor id (`StoredActor`).
    Actors,
    /// Placement groups, keyed by group id (`StoredPlacementGroup`).
    PlacementGroups,
    /// Objects moved off nodes that left, keyed by object id (`from \n holder`).
    ObjectMoves,
    /// Jobs submitted to the job server, keyed by submission id (JSON, Ray's shape).
    Submissions,
    /// Tasks as their owners reported them, keyed by job id and task id (`StoredTaskRow`).
    Tasks,
    /// Trust records of nodes forgotten after their death, keyed by node id (a `NodeInfo`
    /// holding only the key, reliability and GPU check history): read when the id
    /// registers again, never loaded whole.
    ForgottenNodes,
}

impl Table {
    pub const ALL: [Table; 12] = [
        Table::Nodes,
        Table::Jobs,
        Table::Kv,
        Table::Meta,
        Table::Leases,
        Table::Usage,
        Table::Actors,
        Table::PlacementGroups,
        Table::ObjectMoves,
        Table::Submissions,
        Table::Tasks,
        Table::ForgottenNodes,
    ];

    fn name(self) -> &'static str {
        match self {
            Table::Nodes => "nodes",
            Table::Jobs => "jobs",
            Table::Kv => "kv",
            Table::Meta => "meta",
            Table::Leases => "leases",
            Table::Usage => "usage",
            Table::Actors => "actors",
            Table::PlacementGroups => "placement_groups",
            Table::ObjectMoves => "object_moves",
            Table::Submissions => "submissions",
            Table::Tasks => "tasks",
            Table::ForgottenNodes => "forgotten_nodes",
        }
    }
}

/// One change of a [`GcsStorage::write_all`] batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageWrite {
    Put { table: Table, key: Vec<u8>, value: Vec<u8> },
    Delete { table: Table, key: Vec<u8> },
}

pub trait GcsStorage: Send + Sync + 'static {
    /// Stores `value` under `key`, replacing what was there.
    fn put(&self, table: Table, key: &[u8], value: &[u8]) -> GcsResult<()>;
    /// Makes every change of `writes`, in order, as one transaction where the backend
    /// has them (one commit, one sync for the lot).
    fn write_all(&self, writes: &[StorageWrite]) -> GcsResult<()> {
        for write in writes {
            match write {
                StorageWrite::Put { table, key, value } => self.put(*table, key, value)?,
                StorageWrite::Delete { table, key } => {
                    self.delete(*table, key)?;
                }
            }
        }
        Ok(())
    }
    /// Stores `value` only if `key` is absent; returns whether it stored it.
    fn put_if_absent(&self, table: Table, key: &[u8], value: &[u8]) -> GcsResult<bool>;
    fn get(&self, table: Table, key: &[u8]) -> GcsResult<Option<Vec<u8>>>;
    /// Removes `key`; returns whether it was there.
    fn delete(&self, table: Table, key: &[u8]) -> GcsResult<bool>;
    /// Every entry whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> GcsResult<Vec<(Vec<u8>, Vec<u8>)>>;
    /// Removes every key starting with `prefix`; returns how many.
    fn delete_prefix(&self, table: Table, prefix: &[u8]) -> GcsResult<u64>;
    /// A short description for logs ("memory", "file /var/lib/ionet/gcs.redb").
    fn describe(&self) -> String;
}

/// Tables in memory, lost with the process.
#[derive(Default)]
pub struct MemoryStorage {
    tables: Mutex<BTreeMap<Table, BTreeMap<Vec<u8>, Vec<u8>>>>,
}

impl MemoryStorage {
    pub fn new() -> Self {
        Self::default()
    }

    fn with_table<T>(&self, table: Table, f: impl FnOnce(&mut BTreeMap<Vec<u8>, Vec<u8>>) -> T) -> T {
        let mut tables = self.tables.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(tables.entry(table).or_default())
    }
}

impl GcsStorage for MemoryStorage {
    fn put(&self, table: Table, key: &[u8], value: &[u8]) -> GcsResult<()> {
        self.with_table(table, |map| map.insert(key.to_vec(), value.to_vec()));
        Ok(())
    }

    fn put_if_absent(&self, table: Table, key: &[u8], value: &[u8]) -> GcsResult<bool> {
        Ok(self.with_table(table, |map| {
            if map.contains_key(key) {
                false
            } else {
                map.insert(key.to_vec(), value.to_vec());
                true
            }
        }))
    }

    fn get(&self, table: Table, key: &[u8]) -> GcsResult<Option<Vec<u8>>> {
        Ok(self.with_table(table, |map| map.get(key).cloned()))
    }

    fn delete(&self, table: Table, key: &[u8]) -> GcsResult<bool> {
        Ok(self.with_table(table, |map| map.remove(key).is_some()))
    }

    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> GcsResult<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(self.with_table(table, |map| {
            map.range(prefix.to_vec()..)
                .take_while(|(key, _)| key.starts_with(prefix))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect()
        }))
    }

    fn delete_prefix(&self, table: Table, prefix: &[u8]) -> GcsResult<u64> {
        Ok(self.with_table(table, |map| {
            let doomed: Vec<Vec<u8>> = map
                .range(prefix.to_vec()..)
                .take_while(|(key, _)| key.starts_with(prefix))
                .map(|(key, _)| key.clone())
                .collect();
            for key in &doomed {
                map.remove(key);
            }
            doomed.len() as u64
        }))
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

/// Tables in an embedded redb database file.
///
/// **Group commit.** Every call is committed (and synced) before it returns, but calls
/// made at once share a commit: the first caller to find no commit under way takes every
/// write waiting and commits them as one transaction, in the order they came, while the
/// others wait for its result; writes made meanwhile go in the next commit. Ten thousand
/// nodes registering at once were ten thousand syncs one after another (a minute here).
/// A batch whose transaction fails is made again one write per transaction, so one bad
/// write fails alone.
pub struct RedbStorage {
    database: redb::Database,
    path: std::path::PathBuf,
    queue: Mutex<WriteQueue>,
    committed: Condvar,
}

/// Writes waiting for a commit, and the outcomes of committed ones not yet taken.
#[derive(Default)]
struct WriteQueue {
    waiting: Vec<(u64, Write)>,
    next_ticket: u64,
    /// A caller is committing a batch now.
    committing: bool,
    outcomes: HashMap<u64, GcsResult<Outcome>>,
    /// Commits made, for tests of the grouping.
    commits: u64,
}

fn definition(table: Table) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
    TableDefinition::new(table.name())
}

fn storage_error(path: &Path, error: impl std::fmt::Display) -> GcsError {
    GcsError::Storage(format!("{}: {error}", path.display()))
}

/// One call's change, owned so that another caller's thread can commit it.
enum Write {
    Put { table: Table, key: Vec<u8>, value: Vec<u8> },
    PutIfAbsent { table: Table, key: Vec<u8>, value: Vec<u8> },
    Delete { table: Table, key: Vec<u8> },
    DeletePrefix { table: Table, prefix: Vec<u8> },
    All(Vec<StorageWrite>),
}

/// What a write answers its caller.
enum Outcome {
    Done,
    Present(bool),
    Count(u64),
}

impl Write {
    fn apply(&self, txn: &redb::WriteTransaction) -> Result<Outcome, redb::Error> {
        Ok(match self {
            Write::Put { table, key, value } => {
                txn.open_table(definition(*table))?.insert(key.as_slice(), value.as_slice())?;
                Outcome::Done
            }
            Write::PutIfAbsent { table, key, value } => {
                let mut opened = txn.open_table(definition(*table))?;
                let absent = opened.get(key.as_slice())?.is_none();
                if absent {
                    opened.insert(key.as_slice(), value.as_slice())?;
                }
                Outcome::Present(absent)
            }
            Write::Delete { table, key } => {
                Outcome::Present(txn.open_table(definition(*table))?.remove(key.as_slice())?.is_some())
            }
            Write::DeletePrefix { table, prefix } => {
                let mut opened = txn.open_table(definition(*table))?;
                let mut doomed = Vec::new();
                for entry in opened.range(prefix.as_slice()..)? {
                    let (key, _) = entry?;
                    if !key.value().starts_with(prefix) {
                        break;
                    }
                    doomed.push(key.value().to_vec());
                }
                for key in &doomed {
                    opened.remove(key.as_slice())?;
                }
                Outcome::Count(doomed.len() as u64)
            }
            Write::All(writes) => {
                for write in writes {
                    match write {
                        StorageWrite::Put { table, key, value } => {
                            txn.open_table(definition(*table))?.insert(key.as_slice(), value.as_slice())?;
                        }
                        StorageWrite::Delete { table, key } => {
                            txn.open_table(definition(*table))?.remove(key.as_slice())?;
                        }
                    }
                }
                Outcome::Done
            }
        })
    }
}

/// A batch being committed: its outcomes go to the queue when it ends, or, if the
/// commit never came back (a panic under redb), an error for each of its writes, so no
/// caller waits for good; either way the queue is free for the next committer.
struct Committing<'a> {
    storage: &'a RedbStorage,
    tickets: Vec<u64>,
    outcomes: Vec<(u64, GcsResult<Outcome>)>,
}

impl Drop for Committing<'_> {
    fn drop(&mut self) {
        let mut queue = self.storage.lock_queue();
        if self.outcomes.len() == self.tickets.len() {
            queue.commits += 1;
            queue.outcomes.extend(self.outcomes.drain(..));
        } else {
            for ticket in &self.tickets {
                let failed = storage_error(&self.storage.path, "the commit of this write did not finish");
                queue.outcomes.insert(*ticket, Err(failed));
            }
        }
        queue.committing = false;
        self.storage.committed.notify_all();
    }
}

impl RedbStorage {
    /// Opens the file, creating it and its tables if absent.
    pub fn open(path: &Path) -> GcsResult<Self> {
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(|err| storage_error(path, err))?;
            }
        }
        let database = redb::Database::create(path).map_err(|err| storage_error(path, err))?;
        let storage = Self { database, path: path.to_path_buf(), queue: Mutex::default(), committed: Condvar::new() };
        storage.transaction(|txn| {
            for table in Table::ALL {
                txn.open_table(definition(table))?;
            }
            Ok(())
        })?;
        Ok(storage)
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, WriteQueue> {
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes `write` in the next commit and answers once that commit is durable.
    fn write(&self, write: Write) -> GcsResult<Outcome> {
        let mut queue = self.lock_queue();
        let ticket = queue.next_ticket;
        queue.next_ticket += 1;
        queue.waiting.push((ticket, write));
        loop {
            if let Some(outcome) = queue.outcomes.remove(&ticket) {
                return outcome;
            }
            if queue.committing {
                queue = self.committed.wait(queue).unwrap_or_else(|poisoned| poisoned.into_inner());
                continue;
            }
            queue.committing = true;
            let batch = std::mem::take(&mut queue.waiting);
            drop(queue);
            let tickets = batch.iter().map(|(ticket, _)| *ticket).collect();
            let mut committing = Committing { storage: self, tickets, outcomes: Vec::new() };
            committing.outcomes = self.commit(batch);
            drop(committing);
            queue = self.lock_queue();
        }
    }

    /// One transaction for the whole batch; if it fails, one per write.
    fn commit(&self, batch: Vec<(u64, Write)>) -> Vec<(u64, GcsResult<Outcome>)> {
        let together: GcsResult<Vec<Outcome>> =
            self.transaction(|txn| batch.iter().map(|(_, write)| write.apply(txn)).collect());
        match together {
            Ok(outcomes) => batch.iter().map(|(ticket, _)| *ticket).zip(outcomes.into_iter().map(Ok)).collect(),
            Err(err) if batch.len() == 1 => vec![(batch[0].0, Err(err))],
            Err(_) => {
                batch.into_iter().map(|(ticket, write)| (ticket, self.transaction(|txn| write.apply(txn)))).collect()
            }
        }
    }

    fn transaction<T>(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>) -> GcsResult<T> {
        let txn = self.database.begin_write().map_err(|err| storage_error(&self.path, err))?;
        let result = f(&txn).map_err(|err| storage_error(&self.path, err))?;
        txn.commit().map_err(|err| storage_error(&self.path, err))?;
        Ok(result)
    }

    fn read<T>(
        &self,
        table: Table,
        f: impl FnOnce(&redb::ReadOnlyTable<&'static [u8], &'static [u8]>) -> Result<T, redb::Error>,
    ) -> GcsResult<T> {
        let txn = self.database.begin_read().map_err(|err| storage_error(&self.path, err))?;
        let opened = txn.open_table(definition(table)).map_err(|err| storage_error(&self.path, err))?;
        f(&opened).map_err(|err| storage_error(&self.path, err))
    }
}

fn prefix_range(prefix: &[u8]) -> impl Fn(&[u8]) -> bool + '_ {
    move |key: &[u8]| key.starts_with(prefix)
}

impl GcsStorage for RedbStorage {
    fn put(&self, table: Table, key: &[u8], value: &[u8]) -> GcsResult<()> {
        self.write(Write::Put { table, key: key.to_vec(), value: value.to_vec() }).map(drop)
    }

    fn write_all(&self, writes: &[StorageWrite]) -> GcsResult<()> {
        if writes.is_empty() {
            return Ok(());
        }
        self.write(Write::All(writes.to_vec())).map(drop)
    }

    fn put_if_absent(&self, table: Table, key: &[u8], value: &[u8]) -> GcsResult<bool> {
        let outcome = self.write(Write::PutIfAbsent { table, key: key.to_vec(), value: value.to_vec() })?;
        Ok(matches!(outcome, Outcome::Present(true)))
    }

    fn get(&self, table: Table, key: &[u8]) -> GcsResult<Option<Vec<u8>>> {
        self.read(table, |opened| Ok(opened.get(key)?.map(|value| value.value().to_vec())))
    }

    fn delete(&self, table: Table, key: &[u8]) -> GcsResult<bool> {
        let outcome = self.write(Write::Delete { table, key: key.to_vec() })?;
        Ok(matches!(outcome, Outcome::Present(true)))
    }

    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> GcsResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let matches = prefix_range(prefix);
        self.read(table, |opened| {
            let mut entries = Vec::new();
            for entry in opened.range(prefix..)? {
                let (key, value) = entry?;
                if !matches(key.value()) {
                    break;
                }
                entries.push((key.value().to_vec(), value.value().to_vec()));
            }
            Ok(entries)
        })
    }

    fn delete_prefix(&self, table: Table, prefix: &[u8]) -> GcsResult<u64> {
        match self.write(Write::DeletePrefix { table, prefix: prefix.to_vec() })? {
            Outcome::Count(count) => Ok(count),
            Outcome::Done | Outcome::Present(_) => Ok(0),
        }
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(storage: &dyn GcsStorage) {
        storage.put(Table::Kv, b"ns\0a", b"1").unwrap();
        storage.put(Table::Kv, b"ns\0ab", b"2").unwrap();
        storage.put(Table::Kv, b"nt\0a", b"3").unwrap();
        assert!(!storage.put_if_absent(Table::Kv, b"ns\0a", b"9").unwrap());
        assert_eq!(storage.get(Table::Kv, b"ns\0a").unwrap().unwrap(), b"1");
        assert_eq!(storage.get(Table::Jobs, b"ns\0a").unwrap(), None, "tables are separate");
        let keys: Vec<_> = storage.scan_prefix(Table::Kv, b"ns\0").unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec![b"ns\0a".to_vec(), b"ns\0ab".to_vec()]);
        assert_eq!(storage.delete_prefix(Table::Kv, b"ns\0a").unwrap(), 2);
        assert!(storage.delete(Table::Kv, b"nt\0a").unwrap());
        assert!(!storage.delete(Table::Kv, b"nt\0a").unwrap());
        assert!(storage.scan_prefix(Table::Kv, b"").unwrap().is_empty());
        // A batch applies in order: a put then a delete of one key leaves nothing.
        let put =
            |key: &[u8], value: &[u8]| StorageWrite::Put { table: Table::Leases, key: key.into(), value: value.into() };
        let delete = |key: &[u8]| StorageWrite::Delete { table: Table::Leases, key: key.into() };
        storage.write_all(&[put(b"a", b"1"), put(b"b", b"2"), delete(b"a"), put(b"b", b"3"), delete(b"none")]).unwrap();
        let left = storage.scan_prefix(Table::Leases, b"").unwrap();
        assert_eq!(left, vec![(b"b".to_vec(), b"3".to_vec())]);
    }

    #[test]
    fn redis_backend() {
        let server = redis::testing::RedisServer::start();
        let storage = RedisStorage::open(&server.url()).unwrap();
        exercise(&storage);
        // Keys are bytes, ordered as bytes, whatever they hold.
        for key in [&b"k\xff\x00"[..], b"k\xff", b"k\x00", b"k"] {
            storage.put(Table::Meta, key, key).unwrap();
        }
        let keys: Vec<_> = storage.scan_prefix(Table::Meta, b"k\xff").unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec![b"k\xff".to_vec(), b"k\xff\x00".to_vec()]);
        // A second head's connection sees the first's writes.
        let other = RedisStorage::open(&server.url()).unwrap();
        assert_eq!(other.get(Table::Meta, b"k\x00").unwrap().unwrap(), b"k\x00");
        assert!(other.describe().starts_with("redis redis://127.0.0.1:"));
        // A server that is gone is a storage error, not a hang or a panic.
        drop(server);
        let error = storage.get(Table::Meta, b"k").unwrap_err();
        assert!(error.to_string().contains("cannot be reached"), "{error}");
        assert!(RedisStorage::open("redis://127.0.0.1:1/0").is_err());
    }

    #[test]
    fn memory_backend() {
        exercise(&MemoryStorage::new());
    }

    #[test]
    fn redb_writes_made_at_once_share_a_commit() {
        let dir = tempfile::tempdir().unwrap();
        let storage = std::sync::Arc::new(RedbStorage::open(&dir.path().join("gcs.redb")).unwrap());
        let wait_for = |what: &str, done: &dyn Fn(&WriteQueue) -> bool| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while !done(&storage.lock_queue()) {
                assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        let before = storage.lock_queue().commits;
        // A transaction held here keeps the first writer's commit waiting, so the writes
        // made meanwhile queue up behind it.
        let held = storage.database.begin_write().unwrap();
        let first = {
            let storage = storage.clone();
            std::thread::spawn(move || storage.put(Table::Kv, b"first", b"1"))
        };
        wait_for("the first writer to commit", &|queue| queue.committing);
        let writers: Vec<_> = (0..16u8)
            .map(|index| {
                let storage = storage.clone();
                std::thread::spawn(move || {
                    storage.put(Table::Kv, &[b'k', index], &[index]).unwrap();
                    // Each claims one shared key: exactly one finds it absent.
                    storage.put_if_absent(Table::Kv, b"claimed", &[index]).unwrap()
                })
            })
            .collect();
        wait_for("sixteen writes to queue", &|queue| queue.waiting.len() == 16);
        drop(held);
        first.join().unwrap().unwrap();
        let claims = writers.into_iter().map(|writer| writer.join().unwrap()).filter(|claimed| *claimed).count();
        assert_eq!(claims, 1, "one writer claims the key");
        // The first write alone, the sixteen puts together, then their sixteen claims
        // (each writer's second write waits for its first to be durable).
        let commits = storage.lock_queue().commits - before;
        assert!(commits <= 1 + 1 + 16, "writes made at once share a commit: {commits} commits for 33 writes");
        for index in 0..16u8 {
            assert_eq!(storage.get(Table::Kv, &[b'k', index]).unwrap().unwrap(), vec![index]);
        }
        assert_eq!(storage.get(Table::Kv, b"first").unwrap().unwrap(), b"1");
        assert!(storage.lock_queue().outcomes.is_empty(), "every outcome was taken by its caller");
    }

    #[test]
    fn redb_backend_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gcs.redb");
        exercise(&RedbStorage::open(&path).unwrap());
        {
            let storage = RedbStorage::open(&path).unwrap();
            storage.put(Table::Jobs, b"job", b"kept").unwrap();
        }
        let storage = RedbStorage::open(&path).unwrap();
        assert_eq!(storage.get(Table::Jobs, b"job").unwrap().unwrap(), b"kept");
    }
}
