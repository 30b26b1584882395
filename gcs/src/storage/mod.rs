//! Where the control store keeps its tables: a byte-keyed map per table, behind
//! the [`GcsStorage`] trait.
//!
//! Three backends: [`MemoryStorage`] (lost with the process), [`RedbStorage`], an
//! embedded database file: a head restarted with the same `--storage FILE` finds
//! its tables again, and [`RedisStorage`] (`--storage redis://host:port/db`), the same
//! tables on a Redis server, which a head on another machine can take over. Each call is one committed transaction, so a
//! crash loses at most the call in flight. Calls block (file I/O, fsync): the server
//! runs them on tokio's blocking pool, never on a runtime worker.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

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
}

impl Table {
    pub const ALL: [Table; 11] = [
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
pub struct RedbStorage {
    database: redb::Database,
    path: std::path::PathBuf,
}

fn definition(table: Table) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
    TableDefinition::new(table.name())
}

fn storage_error(path: &Path, error: impl std::fmt::Display) -> GcsError {
    GcsError::Storage(format!("{}: {error}", path.display()))
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
        let storage = Self { database, path: path.to_path_buf() };
        storage.write(|txn| {
            for table in Table::ALL {
                txn.open_table(definition(table))?;
            }
            Ok(())
        })?;
        Ok(storage)
    }

    fn write<T>(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>) -> GcsResult<T> {
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
        self.write(|txn| {
            txn.open_table(definition(table))?.insert(key, value)?;
            Ok(())
        })
    }

    fn write_all(&self, writes: &[StorageWrite]) -> GcsResult<()> {
        if writes.is_empty() {
            return Ok(());
        }
        self.write(|txn| {
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
            Ok(())
        })
    }

    fn put_if_absent(&self, table: Table, key: &[u8], value: &[u8]) -> GcsResult<bool> {
        self.write(|txn| {
            let mut opened = txn.open_table(definition(table))?;
            if opened.get(key)?.is_some() {
                return Ok(false);
            }
            opened.insert(key, value)?;
            Ok(true)
        })
    }

    fn get(&self, table: Table, key: &[u8]) -> GcsResult<Option<Vec<u8>>> {
        self.read(table, |opened| Ok(opened.get(key)?.map(|value| value.value().to_vec())))
    }

    fn delete(&self, table: Table, key: &[u8]) -> GcsResult<bool> {
        self.write(|txn| Ok(txn.open_table(definition(table))?.remove(key)?.is_some()))
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
        let matches = prefix_range(prefix);
        self.write(|txn| {
            let mut opened = txn.open_table(definition(table))?;
            let mut doomed = Vec::new();
            for entry in opened.range(prefix..)? {
                let (key, _) = entry?;
                if !matches(key.value()) {
                    break;
                }
                doomed.push(key.value().to_vec());
            }
            for key in &doomed {
                opened.remove(key.as_slice())?;
            }
            Ok(doomed.len() as u64)
        })
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
