//! Cluster configuration: defaults, then a TOML file, then `IONET_*` environment
//! variables, then command-line flags (applied by the caller), each overriding the last.
//!
//! The file is the one named by `--config` or `IONET_CONFIG`. Environment variables are
//! the upper-case field names with an `IONET_` prefix, e.g. `IONET_HEARTBEAT_TIMEOUT_MS`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{IonetError, IonetResult};

/// How much of the head's timeout a node's quiet heartbeats leave after each: a node's
/// own runtime can stand still that long under a burst (10,000 actors created at once
/// on two cores held its heartbeats back 1.5 to 2.7 s), and a timeout of a few seconds
/// would otherwise leave it too little.
pub const IDLE_HEARTBEAT_SLACK_MS: u64 = 2_000;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// How often node daemons heartbeat to the control store when something changed (the
    /// resources they have free); a node with nothing new heartbeats every quarter of the
    /// head's timeout instead ([`ClusterConfig::idle_heartbeat_interval`]).
    pub heartbeat_interval_ms: u64,
    /// A node silent for this long is declared dead.
    pub heartbeat_timeout_ms: u64,
    /// How long the head keeps one of a node's heartbeat streams, or of a process's
    /// `WatchActors` streams, before ending it (its holder opens another): a stream is
    /// admitted by the credential it opened with, so this bounds how long a credential
    /// that ran out or was replaced still heartbeats or hears of actors.
    pub heartbeat_stream_lifetime_ms: u64,
    /// Largest gRPC message accepted by servers.
    pub max_message_bytes: usize,
    /// Largest value the internal KV accepts.
    pub max_kv_value_bytes: usize,
    /// Longest key the internal KV accepts.
    pub max_kv_key_bytes: usize,
    /// Most bytes (keys and values) one account may keep in the KV, its jobs' definition
    /// exports included; the operator's namespaces have no quota.
    pub max_kv_bytes_per_account: u64,
    /// Most KV namespaces one account may use.
    pub max_kv_namespaces_per_account: usize,
    /// First and largest wait between a node daemon's reconnection attempts.
    pub reconnect_initial_backoff_ms: u64,
    pub reconnect_max_backoff_ms: u64,
    /// Length of a settlement epoch; epochs end on multiples of it since the Unix epoch
    /// (hourly by default, on the hour).
    pub epoch_length_ms: u64,
    /// Protocol fee charged to payers on top of usage, in basis points (at most 10000).
    pub protocol_fee_bps: u32,
    /// Availability-reward pool shared among providers, micro-USD per hour of epoch length
    /// (0: none): an epoch of half an hour shares half of it, so closing epochs more often
    /// pays no more in total.
    pub reward_pool_per_hour_micros: u64,
    /// A payer must cover its open leases for this long at their prices (after what it
    /// already owes), or its jobs get no new leases; at zero its running leases end.
    pub credit_horizon_ms: u64,
    /// Most workers on one node whose task is blocked in `get`/`wait` may lend their
    /// lease's CPUs at once (each may make the node start another worker); 0: eight per
    /// CPU, at least 64.
    pub max_blocked_workers: usize,
    /// How long a node has to answer the check of its GPUs: the whole check for simulated
    /// GPUs, and for real ones the allowance (network, hashing) on top of the time their
    /// declared model's published figures give.
    pub gpu_check_deadline_ms: u64,
    /// Mean time between checks of a node's GPUs after the first (each drawn at random
    /// between half and one and a half times it, never while the head's lease book has a
    /// lease of the node's GPUs running).
    pub gpu_check_interval_ms: u64,
    /// Most of a node's idle time its checks may take, in basis points: the interval is
    /// stretched so that the last check's duration is at most this share of it.
    pub gpu_check_idle_share_bps: u32,
    /// Failed checks within [`ClusterConfig::gpu_check_untrusted_window_ms`] that mark a
    /// node untrusted until the operator clears it (`ionet trust`).
    pub gpu_check_untrusted_failures: u32,
    pub gpu_check_untrusted_window_ms: u64,
    /// Least time between checks a node starts unasked (its first, or again while it is
    /// not passing): each costs the head a recomputation of the sampled rows.
    pub gpu_check_min_gap_ms: u64,
    /// Most DEAD actors the head remembers (Ray's `maximum_gcs_destroyed_actor_cached_count`):
    /// past it the longest dead are forgotten, in memory and in storage, so a cluster that
    /// creates and ends actors for ever does not grow its head for ever.
    pub max_dead_actors: usize,
    /// Most DEAD node rows the head keeps (Ray's `maximum_gcs_dead_node_cached_count`):
    /// past it the longest dead whose leases are all settled are forgotten once an epoch
    /// covering their death closes. Each one's trust record (its key, reliability and GPU
    /// check history) stays in storage and comes back if it registers again.
    pub max_dead_nodes: usize,
    /// Rows a node's view of the cluster holds on a large cluster (bounded views): once
    /// the table holds twice this many, each node keeping a view is sent the rows of its
    /// own hash bucket only (this many to twice this many), and asks the head for what
    /// its sample misses; the head's cost of busy views is then this many rows per node,
    /// not the cluster's size. 0: every view is the whole table.
    pub view_sample: usize,
    /// Longest a lease of a node's GPUs may put off its due check: past it the node is
    /// `OVERDUE` (no new leases, no availability rewards; running leases finish) until it
    /// passes, so a provider leasing a sliver of its own GPU to itself cannot dodge checks.
    pub gpu_check_max_defer_ms: u64,
    /// Whether nodes beyond the head's own machine may offer simulated GPUs (declared,
    /// checked on the CPU, billable). Off by default: on a marketplace a provider's
    /// simulated GPU is a GPU nobody can verify; a test cluster across machines turns it on.
    pub accept_remote_simulated_gpus: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 1_000,
            heartbeat_timeout_ms: 10_000,
            heartbeat_stream_lifetime_ms: 600_000,
            max_message_bytes: crate::rpc::DEFAULT_MAX_MESSAGE_BYTES,
            max_kv_value_bytes: 16 * 1024 * 1024,
            max_kv_key_bytes: 4096,
            max_kv_bytes_per_account: 256 * 1024 * 1024,
            max_kv_namespaces_per_account: 1024,
            reconnect_initial_backoff_ms: 100,
            reconnect_max_backoff_ms: 5_000,
            epoch_length_ms: 3_600_000,
            protocol_fee_bps: 250,
            reward_pool_per_hour_micros: 0,
            credit_horizon_ms: 10 * 60_000,
            max_blocked_workers: 0,
            gpu_check_deadline_ms: 10_000,
            gpu_check_interval_ms: 3_600_000,
            gpu_check_idle_share_bps: 100,
            gpu_check_untrusted_failures: 3,
            gpu_check_untrusted_window_ms: 24 * 3_600_000,
            gpu_check_min_gap_ms: 30_000,
            max_dead_actors: 100_000,
            max_dead_nodes: 1_000,
            view_sample: 64,
            gpu_check_max_defer_ms: 4 * 3_600_000,
            accept_remote_simulated_gpus: false,
        }
    }
}

impl ClusterConfig {
    /// How often a node with nothing new heartbeats, for a head that declares nodes dead
    /// after `head_timeout_ms` of silence: a quarter of it (two heartbeats may be late or
    /// lost before the head gives up on the node, and a third nearly), but leaving at
    /// least [`IDLE_HEARTBEAT_SLACK_MS`] of the timeout after it, and never more often
    /// than the interval. Liveness is all such a heartbeat proves, and a quarter of a
    /// timeout proves it as surely as each second did (Ray's health checks are every
    /// 3 s, for 5 failures).
    pub fn idle_heartbeat_interval(&self, head_timeout_ms: u64) -> std::time::Duration {
        let spaced = (head_timeout_ms / 4).min(head_timeout_ms.saturating_sub(IDLE_HEARTBEAT_SLACK_MS));
        std::time::Duration::from_millis(spaced.max(self.heartbeat_interval_ms))
    }

    /// [`ClusterConfig::max_blocked_workers`] for a node of `cpus` CPUs.
    pub fn max_blocked_workers_for(&self, cpus: f64) -> usize {
        if self.max_blocked_workers > 0 {
            return self.max_blocked_workers;
        }
        (cpus.max(1.0) as usize).saturating_mul(8).max(64)
    }

    /// Defaults, overridden by the file (if any), then by the environment.
    pub fn load(file: Option<&Path>) -> IonetResult<Self> {
        let file = file.map(Path::to_path_buf).or_else(|| std::env::var_os("IONET_CONFIG").map(Into::into));
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|err| IonetError::Config(format!("cannot read {}: {err}", path.display())))?;
                Self::from_toml(&text).map_err(|err| IonetError::Config(format!("{}: {err}", path.display())))?
            }
            None => Self::default(),
        };
        config.apply_env(|name| std::env::var(name).ok())?;
        config.validate()?;
        Ok(config)
    }

    pub fn from_toml(text: &str) -> IonetResult<Self> {
        toml::from_str(text).map_err(|err| IonetError::Config(err.to_string()))
    }

    /// Applies `IONET_<FIELD>` overrides read through `lookup`.
    pub fn apply_env(&mut self, lookup: impl Fn(&str) -> Option<String>) -> IonetResult<()> {
        fn read<T: std::str::FromStr>(
            lookup: &impl Fn(&str) -> Option<String>,
            name: &str,
            slot: &mut T,
        ) -> IonetResult<()> {
            if let Some(text) = lookup(name) {
                *slot = text
                    .trim()
                    .parse()
                    .map_err(|_| IonetError::Config(format!("{name}={text:?} is not a valid value")))?;
            }
            Ok(())
        }
        read(&lookup, "IONET_HEARTBEAT_INTERVAL_MS", &mut self.heartbeat_interval_ms)?;
        read(&lookup, "IONET_HEARTBEAT_TIMEOUT_MS", &mut self.heartbeat_timeout_ms)?;
        read(&lookup, "IONET_HEARTBEAT_STREAM_LIFETIME_MS", &mut self.heartbeat_stream_lifetime_ms)?;
        read(&lookup, "IONET_MAX_MESSAGE_BYTES", &mut self.max_message_bytes)?;
        read(&lookup, "IONET_MAX_KV_VALUE_BYTES", &mut self.max_kv_value_bytes)?;
        read(&lookup, "IONET_MAX_KV_KEY_BYTES", &mut self.max_kv_key_bytes)?;
        read(&lookup, "IONET_MAX_KV_BYTES_PER_ACCOUNT", &mut self.max_kv_bytes_per_account)?;
        read(&lookup, "IONET_MAX_KV_NAMESPACES_PER_ACCOUNT", &mut self.max_kv_namespaces_per_account)?;
        read(&lookup, "IONET_RECONNECT_INITIAL_BACKOFF_MS", &mut self.reconnect_initial_backoff_ms)?;
        read(&lookup, "IONET_RECONNECT_MAX_BACKOFF_MS", &mut self.reconnect_max_backoff_ms)?;
        read(&lookup, "IONET_EPOCH_LENGTH_MS", &mut self.epoch_length_ms)?;
        read(&lookup, "IONET_PROTOCOL_FEE_BPS", &mut self.protocol_fee_bps)?;
        read(&lookup, "IONET_REWARD_POOL_PER_HOUR_MICROS", &mut self.reward_pool_per_hour_micros)?;
        read(&lookup, "IONET_CREDIT_HORIZON_MS", &mut self.credit_horizon_ms)?;
        read(&lookup, "IONET_MAX_BLOCKED_WORKERS", &mut self.max_blocked_workers)?;
        read(&lookup, "IONET_GPU_CHECK_DEADLINE_MS", &mut self.gpu_check_deadline_ms)?;
        read(&lookup, "IONET_GPU_CHECK_INTERVAL_MS", &mut self.gpu_check_interval_ms)?;
        read(&lookup, "IONET_GPU_CHECK_IDLE_SHARE_BPS", &mut self.gpu_check_idle_share_bps)?;
        read(&lookup, "IONET_GPU_CHECK_UNTRUSTED_FAILURES", &mut self.gpu_check_untrusted_failures)?;
        read(&lookup, "IONET_GPU_CHECK_UNTRUSTED_WINDOW_MS", &mut self.gpu_check_untrusted_window_ms)?;
        read(&lookup, "IONET_GPU_CHECK_MIN_GAP_MS", &mut self.gpu_check_min_gap_ms)?;
        read(&lookup, "IONET_MAX_DEAD_ACTORS", &mut self.max_dead_actors)?;
        read(&lookup, "IONET_MAX_DEAD_NODES", &mut self.max_dead_nodes)?;
        read(&lookup, "IONET_VIEW_SAMPLE", &mut self.view_sample)?;
        read(&lookup, "IONET_GPU_CHECK_MAX_DEFER_MS", &mut self.gpu_check_max_defer_ms)?;
        if let Some(text) = lookup("IONET_ACCEPT_REMOTE_SIMULATED_GPUS") {
            self.accept_remote_simulated_gpus = match text.trim() {
                "1" | "true" | "yes" => true,
                "0" | "false" | "no" | "" => false,
                _ => {
                    return Err(IonetError::Config(format!(
                        "IONET_ACCEPT_REMOTE_SIMULATED_GPUS={text:?} is not true or false"
                    )))
                }
            };
        }
        Ok(())
    }

    pub fn validate(&self) -> IonetResult<()> {
        if self.heartbeat_interval_ms == 0 {
            return Err(IonetError::Config("heartbeat_interval_ms must be positive".into()));
        }
        if self.heartbeat_timeout_ms <= self.heartbeat_interval_ms {
            return Err(IonetError::Config(format!(
                "heartbeat_timeout_ms ({}) must exceed heartbeat_interval_ms ({})",
                self.heartbeat_timeout_ms, self.heartbeat_interval_ms
            )));
        }
        if self.heartbeat_stream_lifetime_ms <= self.heartbeat_interval_ms {
            return Err(IonetError::Config(format!(
                "heartbeat_stream_lifetime_ms ({}) must exceed heartbeat_interval_ms ({})",
                self.heartbeat_stream_lifetime_ms, self.heartbeat_interval_ms
            )));
        }
        if self.epoch_length_ms == 0 {
            return Err(IonetError::Config("epoch_length_ms must be positive".into()));
        }
        if self.protocol_fee_bps > 10_000 {
            return Err(IonetError::Config(format!(
                "protocol_fee_bps ({}) must be at most 10000",
                self.protocol_fee_bps
            )));
        }
        if self.gpu_check_idle_share_bps == 0 || self.gpu_check_idle_share_bps > 10_000 {
            return Err(IonetError::Config(format!(
                "gpu_check_idle_share_bps ({}) must be between 1 and 10000",
                self.gpu_check_idle_share_bps
            )));
        }
        if self.gpu_check_interval_ms == 0 || self.gpu_check_deadline_ms == 0 || self.gpu_check_max_defer_ms == 0 {
            return Err(IonetError::Config(
                "gpu_check_interval_ms, gpu_check_deadline_ms and gpu_check_max_defer_ms must be positive".into(),
            ));
        }
        if self.gpu_check_untrusted_failures == 0 || self.gpu_check_untrusted_window_ms == 0 {
            return Err(IonetError::Config(
                "gpu_check_untrusted_failures and gpu_check_untrusted_window_ms must be positive".into(),
            ));
        }
        if self.max_kv_value_bytes >= self.max_message_bytes {
            return Err(IonetError::Config("max_kv_value_bytes must be below max_message_bytes".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn quiet_heartbeats_leave_slack_in_short_timeouts() {
        let config = ClusterConfig { heartbeat_interval_ms: 200, ..Default::default() };
        let ms = |timeout| config.idle_heartbeat_interval(timeout).as_millis() as u64;
        assert_eq!(ms(10_000), 2_500, "a quarter of the timeout");
        assert_eq!(ms(4_000), 1_000);
        assert_eq!(ms(2_400), 400, "two seconds of slack left");
        assert_eq!(ms(2_000), 200, "no slack to spare: each interval");
    }

    use super::*;

    #[test]
    fn file_then_env_override_defaults() {
        let mut config =
            ClusterConfig::from_toml("heartbeat_interval_ms = 200\nheartbeat_timeout_ms = 3000\n").unwrap();
        assert_eq!(config.heartbeat_interval_ms, 200);
        assert_eq!(config.max_kv_key_bytes, 4096);
        config.apply_env(|name| (name == "IONET_HEARTBEAT_TIMEOUT_MS").then(|| "1500".to_string())).unwrap();
        assert_eq!(config.heartbeat_timeout_ms, 1500);
        config.validate().unwrap();
    }

    #[test]
    fn bad_values_are_named() {
        let err = ClusterConfig::from_toml("heartbeat_interval = 5").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let mut config = ClusterConfig::default();
        let err = config.apply_env(|_| Some("soon".into())).unwrap_err();
        assert!(err.to_string().contains("is not a valid value"), "{err}");
        let config = ClusterConfig { heartbeat_timeout_ms: 500, ..Default::default() };
        assert!(config.validate().is_err());
        // A heartbeat stream that ends before its first heartbeat would make nodes flap.
        let config = ClusterConfig { heartbeat_stream_lifetime_ms: 1_000, ..Default::default() };
        assert!(config.validate().unwrap_err().to_string().contains("heartbeat_stream_lifetime_ms"));
        let config = ClusterConfig { protocol_fee_bps: 10_001, ..Default::default() };
        assert!(config.validate().unwrap_err().to_string().contains("10001"));
    }

    #[test]
    fn metering_settings_have_defaults_and_env_overrides() {
        let mut config = ClusterConfig::default();
        assert_eq!(
            (config.epoch_length_ms, config.protocol_fee_bps, config.reward_pool_per_hour_micros),
            (3_600_000, 250, 0)
        );
        config
            .apply_env(|name| match name {
                "IONET_EPOCH_LENGTH_MS" => Some("60000".into()),
                "IONET_PROTOCOL_FEE_BPS" => Some("100".into()),
                "IONET_REWARD_POOL_PER_HOUR_MICROS" => Some("5000000".into()),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            (config.epoch_length_ms, config.protocol_fee_bps, config.reward_pool_per_hour_micros),
            (60_000, 100, 5_000_000)
        );
    }
}
