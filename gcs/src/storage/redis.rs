//! The head's tables on a Redis server (`--storage redis://host:port/db`), so that a head
//! on another machine can take over from the same tables.
//!
//! Layout, per table `t` under the key prefix (`ionet:` by default): a hash `ionet:t:v`
//! (key → value) and a sorted set `ionet:t:k` of the same keys, all at score 0, which
//! Redis orders by their bytes: a prefix scan is a `ZRANGEBYLEX`, in key order as the
//! other backends give it. Every change of the two is atomic (`MULTI`, or a Lua script
//! where the change depends on what is there), so a reader never sees a key in one and
//! not the other.
//!
//! Durability is the server's: run it with `appendonly yes` (and `appendfsync always`
//! for what a redb file gives) or a crash of Redis loses what it had not written. Calls
//! block (network round trips): the server runs them on tokio's blocking pool, as the
//! file backend's. A connection that breaks is made again once per call; a call that
//! still fails is the caller's `GcsError::Storage`.

use std::sync::Mutex;
use std::time::Duration;

use redis::{Commands, Script};

use super::{GcsStorage, StorageWrite, Table};
use crate::error::{GcsError, GcsResult};

/// How long a connection attempt, and any one command, may take.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Tables on a Redis server.
pub struct RedisStorage {
    client: redis::Client,
    connection: Mutex<Option<redis::Connection>>,
    /// The address without credentials, for logs and errors.
    shown: String,
    prefix: String,
    /// Writes happen only while this holder holds the head lease (empty: any time).
    fence: String,
    /// A write refused by the fence ends the process (a head's storage).
    exit_when_fenced: bool,
}

/// `url` is a Redis URL: `redis://[user:password@]host:port/db`.
pub fn is_redis_url(url: &str) -> bool {
    url.starts_with("redis://") || url.starts_with("rediss://")
}

impl RedisStorage {
    /// Connects to the server at `url` (checking it answers) and keeps the tables under
    /// keys starting `ionet:`.
    pub fn open(url: &str) -> GcsResult<Self> {
        let client = redis::Client::open(url).map_err(|err| GcsError::Storage(format!("{}: {err}", shown(url))))?;
        let storage = Self {
            client,
            connection: Mutex::new(None),
            shown: shown(url),
            prefix: "ionet:".into(),
            fence: String::new(),
            exit_when_fenced: false,
        };
        storage.call(true, |connection| redis::cmd("PING").query::<String>(connection))?;
        Ok(storage)
    }

    /// [`RedisStorage::open`] for the active head: every write is made only while
    /// `lease`'s holder holds the head lease, so a head that lost it (cut off, paused)
    /// can never write over its successor's tables.
    pub fn open_fenced(url: &str, lease: &HeadLease) -> GcsResult<Self> {
        let mut storage = Self::open(url)?;
        storage.fence = lease.holder.clone();
        storage.exit_when_fenced = lease.exit_when_fenced;
        Ok(storage)
    }

    fn lease_key(&self) -> String {
        format!("{}head_lease", self.prefix)
    }

    /// A script call on `table` with the fence first: KEYS lease, sorted set, hash;
    /// ARGV holder, then `args`.
    /// `resend`: the write may be sent again when its answer is lost (whole puts and
    /// deletes); one whose result says what it found (stored or not, how many removed)
    /// may not: the second's result would be a lie.
    fn invoke<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        table: Table,
        args: &[&[u8]],
        resend: bool,
    ) -> GcsResult<T> {
        self.call(resend, |connection| {
            let mut invocation = script.key(self.lease_key());
            invocation.key(self.keys_of(table)).key(self.values_of(table)).arg(self.fence.as_bytes());
            for arg in args {
                invocation.arg(*arg);
            }
            invocation.invoke(connection)
        })
    }

    fn keys_of(&self, table: Table) -> String {
        format!("{}{}:k", self.prefix, table.name())
    }

    fn values_of(&self, table: Table) -> String {
        format!("{}{}:v", self.prefix, table.name())
    }

    /// Runs `f` on the connection, connecting first if there is none, and once more on a
    /// new connection if this one broke (`resend`: only for what may run twice; else
    /// the broken call's error).
    fn call<T>(
        &self,
        resend: bool,
        mut f: impl FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> GcsResult<T> {
        let mut held = self.connection.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut last = None;
        for _ in 0..2 {
            if held.is_none() {
                match self.connect() {
                    Ok(connection) => *held = Some(connection),
                    Err(err) => {
                        last = Some(err);
                        continue;
                    }
                }
            }
            let connection = held.as_mut().expect("connected above");
            match f(connection) {
                Ok(value) => return Ok(value),
                // This head lost the head lease: another is active. It stops before it
                // does anything more on the strength of tables it can no longer write.
                Err(err) if self.exit_when_fenced && err.to_string().contains("FENCED") => {
                    tracing::error!(storage = %self.shown, "this head no longer holds the head lease: it stops");
                    std::process::exit(1);
                }
                Err(err) if err.is_io_error() || err.is_connection_dropped() || err.is_timeout() => {
                    *held = None;
                    if !resend {
                        return Err(GcsError::Storage(format!(
                            "redis {}: {err} (the write may or may not have landed)",
                            self.shown
                        )));
                    }
                    last = Some(err);
                }
                Err(err) => return Err(GcsError::Storage(format!("redis {}: {err}", self.shown))),
            }
        }
        let why = last.map(|err| err.to_string()).unwrap_or_default();
        Err(GcsError::Storage(format!("redis {} cannot be reached: {why}", self.shown)))
    }

    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let connection = self.client.get_connection_with_timeout(IO_TIMEOUT)?;
        connection.set_read_timeout(Some(IO_TIMEOUT))?;
        connection.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(connection)
    }
}

/// The URL without its password.
fn shown(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://…@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// The `ZRANGEBYLEX` bounds of the keys starting with `prefix`.
fn lex_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    if prefix.is_empty() {
        return (b"-".to_vec(), b"+".to_vec());
    }
    let low = [b"[".as_slice(), prefix].concat();
    // Past every key with the prefix: the prefix with its last byte that can grow, grown.
    let mut next = prefix.to_vec();
    while next.last() == Some(&0xff) {
        next.pop();
    }
    let high = match next.last_mut() {
        Some(last) => {
            *last += 1;
            [b"(".as_slice(), &next].concat()
        }
        None => b"+".to_vec(),
    };
    (low, high)
}

/// The start of every script that writes: KEYS[1] is the head lease, ARGV[1] the holder
/// the writer must be (empty: no fence).
const FENCE: &str = r"
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED this head does not hold the head lease')
end
";

/// KEYS: lease, unused, unused. ARGV: holder, then (op, sorted set, hash, key, value)
/// per change, `p` a put, `d` a delete.
const WRITE: &str = r"
local i = 2
while i <= #ARGV do
  if ARGV[i] == 'p' then
    redis.call('HSET', ARGV[i + 2], ARGV[i + 3], ARGV[i + 4])
    redis.call('ZADD', ARGV[i + 1], 0, ARGV[i + 3])
  else
    redis.call('HDEL', ARGV[i + 2], ARGV[i + 3])
    redis.call('ZREM', ARGV[i + 1], ARGV[i + 3])
  end
  i = i + 5
end
return 0";

/// KEYS: lease, sorted set, hash. ARGV: holder, key. Removes the key; whether it was there.
const DELETE: &str = r"
local removed = redis.call('HDEL', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[2])
return removed";

/// KEYS: lease, sorted set, hash. ARGV: holder, key, value. Stores the value if the key
/// is absent.
const PUT_IF_ABSENT: &str = r"
if redis.call('HSETNX', KEYS[3], ARGV[2], ARGV[3]) == 1 then
  redis.call('ZADD', KEYS[2], 0, ARGV[2])
  return 1
end
return 0";

/// KEYS: sorted set, hash. ARGV: low, high. Every (key, value) in range, flat.
const SCAN: &str = r"
local keys = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], ARGV[2])
local out = {}
for _, key in ipairs(keys) do
  local value = redis.call('HGET', KEYS[2], key)
  if value then
    out[#out + 1] = key
    out[#out + 1] = value
  end
end
return out";

/// KEYS: lease, sorted set, hash. ARGV: holder, low, high. Removes every key in range;
/// how many.
const DELETE_RANGE: &str = r"
local keys = redis.call('ZRANGEBYLEX', KEYS[2], ARGV[2], ARGV[3])
for _, key in ipairs(keys) do
  redis.call('HDEL', KEYS[3], key)
  redis.call('ZREM', KEYS[2], key)
end
return #keys";

/// A script that writes: the fence, then `body` (made once: a script's hash is its name).
macro_rules! fenced {
    ($body:expr) => {{
        static SCRIPT: std::sync::LazyLock<Script> =
            std::sync::LazyLock::new(|| Script::new(&format!("{FENCE}{}", $body)));
        &*SCRIPT
    }};
}

impl GcsStorage for RedisStorage {
    fn put(&self, table: Table, key: &[u8], value: &[u8]) -> GcsResult<()> {
        self.write_all(&[StorageWrite::Put { table, key: key.to_vec(), value: value.to_vec() }])
    }

    fn write_all(&self, writes: &[StorageWrite]) -> GcsResult<()> {
        if writes.is_empty() {
            return Ok(());
        }
        let mut args: Vec<Vec<u8>> = Vec::with_capacity(writes.len() * 5);
        for write in writes {
            let (op, table, key, value) = match write {
                StorageWrite::Put { table, key, value } => (b"p", table, key, value.as_slice()),
                StorageWrite::Delete { table, key } => (b"d", table, key, &[][..]),
            };
            args.extend([op.to_vec(), self.keys_of(*table).into_bytes(), self.values_of(*table).into_bytes()]);
            args.extend([key.clone(), value.to_vec()]);
        }
        let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        // The table's keys are unused: every change names its own.
        self.invoke::<i64>(fenced!(WRITE), writes_table(writes), &args, true).map(|_| ())
    }

    fn put_if_absent(&self, table: Table, key: &[u8], value: &[u8]) -> GcsResult<bool> {
        let stored: i64 = self.invoke(fenced!(PUT_IF_ABSENT), table, &[key, value], false)?;
        Ok(stored == 1)
    }

    fn get(&self, table: Table, key: &[u8]) -> GcsResult<Option<Vec<u8>>> {
        self.call(true, |connection| connection.hget(self.values_of(table), key))
    }

    fn delete(&self, table: Table, key: &[u8]) -> GcsResult<bool> {
        let removed: i64 = self.invoke(fenced!(DELETE), table, &[key], false)?;
        Ok(removed > 0)
    }

    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> GcsResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let (low, high) = lex_range(prefix);
        let script = Script::new(SCAN);
        let flat: Vec<Vec<u8>> = self.call(true, |connection| {
            script.key(self.keys_of(table)).key(self.values_of(table)).arg(&low).arg(&high).invoke(connection)
        })?;
        let mut entries = Vec::with_capacity(flat.len() / 2);
        let mut items = flat.into_iter();
        while let (Some(key), Some(value)) = (items.next(), items.next()) {
            entries.push((key, value));
        }
        Ok(entries)
    }

    fn delete_prefix(&self, table: Table, prefix: &[u8]) -> GcsResult<u64> {
        let (low, high) = lex_range(prefix);
        self.invoke(fenced!(DELETE_RANGE), table, &[&low, &high], false)
    }

    fn describe(&self) -> String {
        format!("redis {}", self.shown)
    }
}

/// The table of a batch's first change (a script names its keys; the batch's own name
/// theirs as arguments).
fn writes_table(writes: &[StorageWrite]) -> Table {
    match writes.first() {
        Some(StorageWrite::Put { table, .. } | StorageWrite::Delete { table, .. }) => *table,
        None => Table::Meta,
    }
}

/// Which head is active, among heads sharing one Redis: the one holding the head lease,
/// a key that expires unless its holder renews it. A head takes it before it serves
/// ([`HeadLease::take`], standing by until it can), renews it every third of its time,
/// and stops (the process exits) the moment a renewal fails, before the lease can pass
/// to another: its storage is fenced by the same key, so it could not write anyway.
pub struct HeadLease {
    storage: RedisStorage,
    /// This head: its address and a random tag, unique per process.
    holder: String,
    ttl: Duration,
    /// Storage fenced by this lease ends the process when a write is refused.
    exit_when_fenced: bool,
}

/// KEYS: lease. ARGV: holder, milliseconds. Extends the lease if the holder holds it.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0";

impl HeadLease {
    /// The lease on the Redis at `url`, for a head at `address`, lasting `ttl` unless
    /// renewed.
    pub fn new(url: &str, address: &str, ttl: Duration) -> GcsResult<Self> {
        let holder = format!("{address} {}", hex::encode(rand::random::<[u8; 8]>()));
        Ok(Self { storage: RedisStorage::open(url)?, holder, ttl, exit_when_fenced: false })
    }

    /// A head's lease: its storage's writes refused by the fence end the process (it is
    /// no longer the active head and must not act as one).
    pub fn exiting_when_fenced(mut self) -> Self {
        self.exit_when_fenced = true;
        self
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn millis(&self) -> u64 {
        self.ttl.as_millis().clamp(1, u128::from(u64::MAX)) as u64
    }

    /// Takes the lease if no head holds it; whether this head holds it now.
    pub fn try_take(&self) -> GcsResult<bool> {
        let key = self.storage.lease_key();
        let taken: Option<String> = self.storage.call(true, |connection| {
            redis::cmd("SET").arg(&key).arg(&self.holder).arg("NX").arg("PX").arg(self.millis()).query(connection)
        })?;
        Ok(taken.is_some() || self.renew()?)
    }

    /// Extends the lease; whether this head still holds it.
    pub fn renew(&self) -> GcsResult<bool> {
        let script = Script::new(RENEW);
        let renewed: i64 = self.storage.call(true, |connection| {
            script.key(self.storage.lease_key()).arg(&self.holder).arg(self.millis()).invoke(connection)
        })?;
        Ok(renewed == 1)
    }

    /// The holder of the lease now (`address tag`), if any.
    pub fn holder_now(&self) -> GcsResult<Option<String>> {
        let key = self.storage.lease_key();
        self.storage.call(true, |connection| connection.get(&key))
    }
}

/// A real `redis-server` for tests, on a free loopback port, its files in a directory of
/// its own; stopped when dropped. Installs Debian's `redis-server` package first when
/// the machine has none (tests run as root on a fresh machine).
#[doc(hidden)]
pub mod testing {
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    pub struct RedisServer {
        child: Child,
        port: u16,
        _dir: tempfile::TempDir,
    }

    /// The `redis-server` binary, installed from Debian's package if it is missing.
    fn binary() -> PathBuf {
        let find = || {
            std::env::var_os("PATH")
                .map(|path| std::env::split_paths(&path).map(|dir| dir.join("redis-server")).collect::<Vec<_>>())
                .unwrap_or_default()
                .into_iter()
                .chain([PathBuf::from("/usr/bin/redis-server")])
                .find(|candidate| candidate.is_file())
        };
        if let Some(found) = find() {
            return found;
        }
        // One installer at a time across test processes.
        let lock = std::fs::File::create(std::env::temp_dir().join("ionet-redis-install.lock")).unwrap();
        // SAFETY: flock on a file this process opened (released when it closes).
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
        if let Some(found) = find() {
            return found;
        }
        let install = |update: bool| {
            if update {
                let _ = Command::new("apt-get").args(["update", "-q"]).status();
            }
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends", "redis-server"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .is_ok_and(|status| status.success())
        };
        if !install(false) && !install(true) {
            panic!("redis-server is not installed and apt-get could not install it (tests need Debian's redis-server)");
        }
        find().expect("redis-server after installing it")
    }

    impl RedisServer {
        /// Starts a server and waits until it answers.
        pub fn start() -> Self {
            let binary = binary();
            for _ in 0..5 {
                let dir = tempfile::tempdir().unwrap();
                let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
                let child = Command::new(&binary)
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
                    .args(["--appendonly", "yes", "--appendfsync", "always"])
                    .arg("--dir")
                    .arg(dir.path())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-server starts");
                let mut server = RedisServer { child, port, _dir: dir };
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline {
                    if server.child.try_wait().unwrap().is_some() {
                        break; // The port was taken meanwhile: another one.
                    }
                    let answered = redis::Client::open(server.url())
                        .and_then(|client| client.get_connection_with_timeout(Duration::from_millis(200)))
                        .and_then(|mut connection| redis::cmd("PING").query::<String>(&mut connection));
                    if answered.is_ok() {
                        return server;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = server.child.kill();
            }
            panic!("redis-server did not start");
        }

        /// `redis://127.0.0.1:port/0`.
        pub fn url(&self) -> String {
            format!("redis://127.0.0.1:{}/0", self.port)
        }
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lex_ranges_cover_exactly_the_prefix() {
        assert_eq!(lex_range(b""), (b"-".to_vec(), b"+".to_vec()));
        assert_eq!(lex_range(b"ab"), (b"[ab".to_vec(), b"(ac".to_vec()));
        assert_eq!(lex_range(b"a\xff"), (b"[a\xff".to_vec(), b"(b".to_vec()));
        assert_eq!(lex_range(b"\xff\xff"), (b"[\xff\xff".to_vec(), b"+".to_vec()));
    }

    /// Two heads on one Redis: one holds the lease, the other stands by; the holder's
    /// writes go through, the other's are refused; once the holder stops renewing, the
    /// other takes over and the old holder can write no more.
    #[test]
    fn the_head_lease_picks_one_writer() {
        let server = testing::RedisServer::start();
        let ttl = Duration::from_millis(400);
        let first = HeadLease::new(&server.url(), "127.0.0.1:1", ttl).unwrap();
        let second = HeadLease::new(&server.url(), "127.0.0.1:2", ttl).unwrap();
        assert!(first.try_take().unwrap());
        assert!(!second.try_take().unwrap(), "one head at a time");
        assert!(first.holder_now().unwrap().unwrap().starts_with("127.0.0.1:1 "));
        let active = RedisStorage::open_fenced(&server.url(), &first).unwrap();
        let standby = RedisStorage::open_fenced(&server.url(), &second).unwrap();
        active.put(Table::Kv, b"k", b"1").unwrap();
        let refused = standby.put(Table::Kv, b"k", b"2").unwrap_err();
        assert!(refused.to_string().contains("does not hold the head lease"), "{refused}");
        assert!(standby.delete(Table::Kv, b"k").is_err());
        assert!(standby.put_if_absent(Table::Kv, b"other", b"2").is_err());
        assert!(standby.delete_prefix(Table::Kv, b"").is_err());
        assert_eq!(standby.get(Table::Kv, b"k").unwrap().unwrap(), b"1", "reads are anyone's");
        assert!(first.renew().unwrap());

        // The first stops renewing (killed): the lease lapses and the second takes it.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !second.try_take().unwrap() {
            assert!(std::time::Instant::now() < deadline, "the lease never lapsed");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!first.renew().unwrap(), "the old holder learns it lost the lease");
        assert!(active.put(Table::Kv, b"k", b"3").is_err(), "the old holder cannot write");
        standby.put(Table::Kv, b"k", b"4").unwrap();
        assert_eq!(active.get(Table::Kv, b"k").unwrap().unwrap(), b"4");
    }

    #[test]
    fn urls_are_shown_without_their_password() {
        assert_eq!(shown("redis://:secret@db:6379/0"), "redis://…@db:6379/0");
        assert_eq!(shown("redis://db:6379/0"), "redis://db:6379/0");
    }
}
