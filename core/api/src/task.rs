//! What `#[ionet::remote]` expands into: the registry of remote functions, argument
//! and return encoding (bincode over serde), and the submission entry point.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::object_ref::{Arg, ObjectRef};
use crate::options::TaskOptions;
use crate::runtime;

/// A function a worker process can run by name.
pub struct RemoteFunction {
    pub name: &'static str,
    pub invoke: fn(Vec<ArgBytes>) -> Result<Vec<u8>, Failure>,
    /// Whether a call learnt to be short may run in place on the worker's event loop.
    /// True for Rust code, whose waits go through ionet (which hands the event loop's
    /// work to another thread first); false for code that may wait in ways the runtime
    /// cannot see (Python's asyncio needs the event loop to deliver its results).
    pub in_place: bool,
}

inventory::collect!(RemoteFunction);

/// Looks a function up by its registered name.
pub fn lookup(name: &str) -> Option<&'static RemoteFunction> {
    inventory::iter::<RemoteFunction>.into_iter().find(|function| function.name == name)
}

/// One argument's encoded value, as the worker receives it.
pub struct ArgBytes(pub(crate) crate::object_store::Bytes);

impl std::fmt::Debug for ArgBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ArgBytes({} bytes)", self.0.len())
    }
}

impl ArgBytes {
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }
}

/// Why a task did not produce a value, as the function's side reports it.
#[derive(Debug)]
pub struct Failure {
    pub(crate) kind: FailureKind,
    pub(crate) message: String,
    /// The failure as the function's language wrote it (a pickled Python exception),
    /// carried apart from the text; empty for a Rust function.
    pub(crate) payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    Error,
    Panic,
    UnknownFunction,
    BadArguments,
    /// An error the task's options say is never retried.
    FinalError,
}

impl Failure {
    pub fn error(message: String) -> Self {
        Self { kind: FailureKind::Error, message, payload: Vec::new() }
    }

    /// An error never retried, whatever `retry_exceptions` says.
    pub fn final_error(message: String) -> Self {
        Self { kind: FailureKind::FinalError, message, payload: Vec::new() }
    }

    pub fn bad_arguments(message: String) -> Self {
        Self { kind: FailureKind::BadArguments, message, payload: Vec::new() }
    }

    pub fn unknown_function(message: String) -> Self {
        Self { kind: FailureKind::UnknownFunction, message, payload: Vec::new() }
    }

    /// The same failure, carrying its language's own form of it.
    pub fn with_payload(mut self, payload: Vec<u8>) -> Self {
        self.payload = payload;
        self
    }

    pub(crate) fn panic(message: String) -> Self {
        Self { kind: FailureKind::Panic, message, payload: Vec::new() }
    }
}

/// The error a caller sees for a failure reply of `function`.
pub(crate) fn task_failed(
    function: String,
    failure: ionet_common::rpc::proto::worker::TaskFailure,
) -> ionet_common::IonetError {
    ionet_common::IonetError::TaskFailed {
        function,
        node: crate::runtime::hex_short(&failure.node_id),
        message: failure.message,
        payload: failure.payload,
    }
}

pub(crate) fn codec() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes a value for the wire or the store.
pub fn encode_value<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
    bincode::serde::encode_to_vec(value, codec())
        .map_err(|err| format!("cannot serialise {}: {err}", std::any::type_name::<T>()))
}

/// Decodes a value written by [`encode_value`]. The bytes may come from a peer: bincode
/// allocates a container's claimed length before reading it, so decoding runs with a
/// limit on claimed bytes proportional to the input (64 times it, at least 1 MiB; no value
/// of this many bytes needs more), and a claim no input of this size could back is an
/// error instead of an allocation that aborts the process.
pub fn decode_value<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let budget = bytes.len().saturating_mul(64);
    let decoded = if budget <= 1 << 20 {
        decode_within::<T, { 1 << 20 }>(bytes)
    } else if budget <= 1 << 28 {
        decode_within::<T, { 1 << 28 }>(bytes)
    } else if budget <= 1 << 34 {
        decode_within::<T, { 1 << 34 }>(bytes)
    } else if budget <= 1 << 40 {
        decode_within::<T, { 1 << 40 }>(bytes)
    } else {
        decode_within::<T, { 1 << 46 }>(bytes)
    };
    decoded.map_err(|err| format!("cannot deserialise {}: {err}", std::any::type_name::<T>()))
}

fn decode_within<T: DeserializeOwned, const LIMIT: usize>(bytes: &[u8]) -> Result<T, bincode::error::DecodeError> {
    bincode::serde::decode_from_slice(bytes, codec().with_limit::<LIMIT>()).map(|(value, _)| value)
}

pub fn encode_return<T: Serialize>(value: &T) -> Result<Vec<u8>, Failure> {
    encode_value(value).map_err(Failure::error)
}

pub fn decode_arg<T: DeserializeOwned>(arg: &ArgBytes, index: usize) -> Result<T, Failure> {
    decode_value(arg.as_slice()).map_err(|why| Failure::bad_arguments(format!("argument {index}: {why}")))
}

pub use crate::submit::{DEFAULT_MAX_PENDING_TASKS, MAX_PENDING_TASKS_ENV};

/// How many tasks this process has submitted that have not finished (a driver's
/// `remote()` waits while [`MAX_PENDING_TASKS_ENV`] are); 0 before `init`.
pub fn pending_tasks() -> usize {
    crate::runtime::current().map(|worker| worker.pending.count()).unwrap_or(0)
}

/// Submits a call of the registered function `name`; returns once the task is counted
/// (a driver with too many pending waits first).
pub fn submit<R>(name: &'static str, options: TaskOptions, args: Vec<Arg>) -> ObjectRef<R> {
    runtime::submit_task(name, &[], options, args)
}

/// [`submit`] for a generic function that runs many kinds of work (the Python task runs
/// any Python function): `kind` names the work, so that run times are learnt per kind
/// (they decide how deep tasks may queue on one worker).
pub fn submit_kind<R>(name: &'static str, kind: &[u8], options: TaskOptions, args: Vec<Arg>) -> ObjectRef<R> {
    runtime::submit_task(name, kind, options, args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]

        /// A task's arguments and a value's bytes come from peers: random bytes (lengths
        /// that claim far more than is there included) are an error, never a panic and
        /// never an allocation of what the bytes claim.
        #[test]
        fn random_bytes_decode_to_an_error_not_a_crash(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
        ) {
            let _ = decode_value::<Vec<String>>(&bytes);
            let _ = decode_value::<Vec<Vec<u8>>>(&bytes);
            let _ = decode_value::<(String, u64, Vec<f64>)>(&bytes);
            let _ = decode_value::<HashMap<String, Vec<u32>>>(&bytes);
            let _ = decode_value::<Option<Box<(i64, String)>>>(&bytes);
        }
    }

    #[test]
    fn a_length_claiming_exabytes_is_refused() {
        // A varint length of u64::MAX, then nothing; and one such inside a list of one.
        let mut huge = vec![253u8];
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode_value::<Vec<u8>>(&huge).is_err());
        assert!(decode_value::<String>(&huge).is_err());
        assert!(decode_value::<Vec<String>>(&huge).is_err());
        let nested = [vec![1u8], huge].concat();
        assert!(decode_value::<Vec<String>>(&nested).is_err());
        assert!(decode_value::<Vec<Vec<u8>>>(&nested).is_err());
        // A real value still decodes, large ones included.
        let big: Vec<Vec<u8>> = (0..1000).map(|i| vec![i as u8; i]).collect();
        assert_eq!(decode_value::<Vec<Vec<u8>>>(&encode_value(&big).unwrap()).unwrap(), big);
        let empties = vec![Vec::<u64>::new(); 100_000];
        assert_eq!(decode_value::<Vec<Vec<u64>>>(&encode_value(&empties).unwrap()).unwrap(), empties);
    }
}
