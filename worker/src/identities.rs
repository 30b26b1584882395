//! Who a job's workers run as on this machine: a uid of their own per job, and a gid per
//! account (the group that may read the account's objects in the node's store).
//!
//! A node daemon started as root gives every job an unprivileged uid no other job, user
//! or daemon has, so tenant code cannot read the node's key, the session directory, the
//! daemon's files or another job's files, nor signal another job's processes; its
//! objects are readable by its account's group alone (see `objects`). Workers start with
//! umask 077, so what they write elsewhere is theirs alone too.
//!
//! The uids are taken in order from `base` and never given twice on this machine: the
//! next one is kept in a file (`worker_uids` in the session), locked while it is taken,
//! so neither a job of a later daemon nor one of another daemon sharing the session ever
//! gets the uid of files an earlier job left behind. Gids come from the same count (an
//! account's is taken when a daemon first meets it), so two daemons on one machine never
//! label two accounts' objects with one group. Why uids, not a
//! user namespace: an unprivileged namespace maps the daemon's own uid inside it, which
//! still owns the daemon's files outside; only distinct uids keep tenants out of them.
//! A daemon that is not root cannot change uid: its workers run as itself, and it says
//! so when it starts.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ionet_common::{IonetError, IonetResult, JobId};

/// Default first uid for jobs: far above login users and the subordinate ranges
/// (`/etc/subuid`) container tools hand out, below 2^31 (which some tools misread).
pub const DEFAULT_UID_BASE: u32 = 2_000_000_000;
/// Ids (uids of jobs, gids of accounts, from one count) a machine hands out before its
/// nodes refuse new jobs.
const RANGE: u32 = 100_000_000;

/// A job's identity on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

struct Assigned {
    jobs: HashMap<JobId, Identity>,
    accounts: HashMap<Arc<str>, u32>,
}

pub struct WorkerIdentities {
    base: u32,
    state: PathBuf,
    assigned: Mutex<Assigned>,
}

impl WorkerIdentities {
    /// Identities from `base` on, the next uid kept in `state`. `None` when this process
    /// cannot change uid (not root): workers then run as the daemon's own user.
    pub fn new(base: u32, state: PathBuf) -> IonetResult<Option<Self>> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        let top = base.checked_add(RANGE).ok_or_else(|| {
            IonetError::Config(format!("worker uid base {base} leaves no room for {} uids and gids", RANGE))
        })?;
        check_mapped("/proc/self/uid_map", base, top)?;
        check_mapped("/proc/self/gid_map", base, top)?;
        let identities =
            Self { base, state, assigned: Mutex::new(Assigned { jobs: HashMap::new(), accounts: HashMap::new() }) };
        // Checked now: a state file that is not ours, or full, fails the start, not a job.
        identities.with_next_uid(|_| Ok(false))?;
        Ok(Some(identities))
    }

    /// Runs `step` on the next free uid with the state file locked (daemons on one
    /// machine share it); `step` returning `true` takes that uid.
    fn with_next_uid(&self, step: impl FnOnce(u32) -> IonetResult<bool>) -> IonetResult<u32> {
        use std::io::{Read, Seek, Write};
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        let at = |err: std::io::Error| IonetError::Config(format!("worker uids in {}: {err}", self.state.display()));
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.state)
            .map_err(at)?;
        // SAFETY: plain syscall on a descriptor we own; released when `file` closes.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(at(std::io::Error::last_os_error()));
        }
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(at)?;
        let next = match text.trim() {
            "" => self.base,
            written => written.parse::<u32>().map_err(|_| {
                IonetError::Config(format!("{} does not hold the next worker uid: {written:?}", self.state.display()))
            })?,
        };
        if !(self.base..self.base + RANGE).contains(&next) {
            return Err(IonetError::ResourceExhausted(format!(
                "the next worker uid ({next}, from {}) is outside {}..{}: pass another --worker-uid-base",
                self.state.display(),
                self.base,
                self.base + RANGE
            )));
        }
        if step(next)? {
            // Written before it is used: a crash never hands the uid out again.
            file.seek(std::io::SeekFrom::Start(0)).map_err(at)?;
            file.set_len(0).map_err(at)?;
            file.write_all((next + 1).to_string().as_bytes()).map_err(at)?;
            file.sync_all().map_err(at)?;
        }
        Ok(next)
    }

    /// The identity of `job`'s workers (the same for all of them), paid by `account`.
    pub fn of_job(&self, job: JobId, account: &Arc<str>) -> IonetResult<Identity> {
        let mut assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(identity) = assigned.jobs.get(&job) {
            return Ok(*identity);
        }
        let uid = self.with_next_uid(|_| Ok(true))?;
        let gid = match assigned.accounts.get(account) {
            Some(gid) => *gid,
            None => {
                let gid = self.with_next_uid(|_| Ok(true))?;
                assigned.accounts.insert(account.clone(), gid);
                gid
            }
        };
        let identity = Identity { uid, gid };
        assigned.jobs.insert(job, identity);
        Ok(identity)
    }

    /// A uid of its own for a process of `account` that is no job's worker (a submitted
    /// job's entrypoint), in the account's group (so it reads the account's objects).
    pub fn fresh(&self, account: &Arc<str>) -> IonetResult<Identity> {
        let gid = self.group_of_account(account)?;
        let uid = self.with_next_uid(|_| Ok(true))?;
        Ok(Identity { uid, gid })
    }

    /// A uid and a gid of their own, in no account's group: for a process that builds
    /// something every account may use (a package environment), which nobody else may
    /// touch while it runs.
    pub fn builder(&self) -> IonetResult<Identity> {
        let uid = self.with_next_uid(|_| Ok(true))?;
        let gid = self.with_next_uid(|_| Ok(true))?;
        Ok(Identity { uid, gid })
    }

    /// The group of `account`'s objects, given one now if it has none yet.
    pub fn group_of_account(&self, account: &Arc<str>) -> IonetResult<u32> {
        let mut assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(gid) = assigned.accounts.get(account) {
            return Ok(*gid);
        }
        let gid = self.with_next_uid(|_| Ok(true))?;
        assigned.accounts.insert(account.clone(), gid);
        Ok(gid)
    }
}

/// Refuses a range this process's user namespace does not map (`setuid` to it would
/// fail at every worker start).
fn check_mapped(map: &str, from: u32, to: u32) -> IonetResult<()> {
    let Ok(text) = std::fs::read_to_string(map) else { return Ok(()) };
    let covered = text.lines().any(|line| {
        let fields: Vec<u64> = line.split_whitespace().filter_map(|field| field.parse().ok()).collect();
        matches!(fields[..], [inside, _, count] if inside <= u64::from(from) && u64::from(to) <= inside + count)
    });
    if covered {
        return Ok(());
    }
    Err(IonetError::Config(format!(
        "ids {from}..{to} for jobs' workers are not mapped in this machine's user namespace ({map}): pass \
         --worker-uid-base with a free range inside it"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_job_has_its_own_uid_and_each_account_its_gid_never_reused() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: only root changes uid");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("worker_uids");
        let identities = WorkerIdentities::new(DEFAULT_UID_BASE, state.clone()).unwrap().unwrap();
        let (acme, beta): (Arc<str>, Arc<str>) = ("acme".into(), "beta".into());
        let one = identities.of_job(JobId::from_bytes(&[0, 0, 0, 1]).unwrap(), &acme).unwrap();
        let two = identities.of_job(JobId::from_bytes(&[0, 0, 0, 2]).unwrap(), &acme).unwrap();
        let three = identities.of_job(JobId::from_bytes(&[0, 0, 0, 3]).unwrap(), &beta).unwrap();
        assert_eq!(identities.of_job(JobId::from_bytes(&[0, 0, 0, 1]).unwrap(), &acme).unwrap(), one);
        assert!(one.uid != two.uid && two.uid != three.uid && one.uid != three.uid);
        assert_eq!(one.gid, two.gid, "one account, one group");
        assert_ne!(one.gid, three.gid);
        assert!(one.uid >= DEFAULT_UID_BASE && one.uid != 0 && one.gid != 0);
        // A later daemon on this machine starts after the uids already given.
        let later = WorkerIdentities::new(DEFAULT_UID_BASE, state).unwrap().unwrap();
        let four = later.of_job(JobId::from_bytes(&[0, 0, 0, 1]).unwrap(), &acme).unwrap();
        assert!(four.uid > three.uid, "{four:?} after {three:?}");
    }
}
