//! Fixed-size binary identifiers, displayed and parsed as lowercase hex.
//!
//! Sizes follow Ray's so that ids read familiarly in logs: a job id is 4 bytes
//! (assigned in sequence by the control store), node, worker and object ids 28,
//! task ids 24, actor ids 16, placement-group ids 18. Random ids come from the
//! OS-seeded thread RNG; nothing relies on their ordering.

use std::fmt;
use std::str::FromStr;

use rand::RngCore;

use crate::error::{IonetError, IonetResult};

macro_rules! define_id {
    ($(#[$doc:meta])* $name:ident, $len:expr, $label:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; $len]);

        impl $name {
            /// Length of the binary form in bytes.
            pub const LEN: usize = $len;

            /// A fresh random id.
            pub fn random() -> Self {
                let mut bytes = [0u8; $len];
                rand::thread_rng().fill_bytes(&mut bytes);
                Self(bytes)
            }

            pub const fn from_array(bytes: [u8; $len]) -> Self {
                Self(bytes)
            }

            pub const fn to_array(&self) -> [u8; $len] {
                self.0
            }

            /// Parses the binary form, refusing any other length.
            pub fn from_bytes(bytes: &[u8]) -> IonetResult<Self> {
                let array: [u8; $len] = bytes.try_into().map_err(|_| {
                    IonetError::InvalidArgument(format!(
                        "{} must be {} bytes, got {}",
                        $label,
                        $len,
                        bytes.len()
                    ))
                })?;
                Ok(Self(array))
            }

            pub fn as_bytes(&self) -> &[u8] {
                &self.0
            }

            pub fn to_vec(&self) -> Vec<u8> {
                self.0.to_vec()
            }

            pub fn hex(&self) -> String {
                hex::encode(self.0)
            }

            /// First 8 hex digits: enough to tell ids apart in logs and tables.
            pub fn short(&self) -> String {
                let mut hex = self.hex();
                hex.truncate(8);
                hex
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = IonetError;

            fn from_str(text: &str) -> IonetResult<Self> {
                let bytes = hex::decode(text).map_err(|err| {
                    IonetError::InvalidArgument(format!("{} {text:?} is not hex: {err}", $label))
                })?;
                Self::from_bytes(&bytes)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.hex())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

define_id!(
    /// A job: one driver program's lifetime in the cluster.
    JobId, 4, "job id"
);
define_id!(
    /// A node: one node daemon, one machine.
    NodeId, 28, "node id"
);
define_id!(
    /// A worker process.
    WorkerId, 28, "worker id"
);
define_id!(
    /// One execution of a remote function or actor method.
    TaskId, 24, "task id"
);
define_id!(
    /// An actor.
    ActorId, 16, "actor id"
);
define_id!(
    /// An object in the distributed object store.
    ObjectId, 28, "object id"
);
define_id!(
    /// A lease of resources and a worker, granted by a node daemon and metered by the
    /// control store.
    LeaseId, 16, "lease id"
);
define_id!(
    /// A placement group.
    PlacementGroupId, 18, "placement group id"
);

impl TaskId {
    /// The task that creates `actor` (each incarnation is an attempt of it): the actor's
    /// id, then eight bytes of `0xff` (a random task id has them with odds of 2^-64).
    pub fn actor_creation(actor: &ActorId) -> Self {
        let mut bytes = [0xff; TaskId::LEN];
        bytes[..ActorId::LEN].copy_from_slice(actor.as_bytes());
        Self(bytes)
    }

    /// Whether `task_id` (bytes) has the form of an actor's creation task (some actor's
    /// id, then eight `0xff` bytes): the head's to record, no owner's.
    pub fn names_an_actor_creation(task_id: &[u8]) -> bool {
        task_id.len() == TaskId::LEN && task_id[ActorId::LEN..].iter().all(|byte| *byte == 0xff)
    }

    /// Whether `task_id` (bytes) is the task that creates the actor `actor_id` (bytes).
    pub fn is_actor_creation(task_id: &[u8], actor_id: &[u8]) -> bool {
        Self::names_an_actor_creation(task_id) && task_id[..ActorId::LEN] == *actor_id
    }
}

impl JobId {
    /// Job ids are assigned by the control store in sequence.
    pub fn from_sequence(sequence: u32) -> Self {
        Self(sequence.to_be_bytes())
    }

    pub fn sequence(&self) -> u32 {
        u32::from_be_bytes(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = NodeId::random();
        let parsed: NodeId = id.to_string().parse().unwrap();
        assert_eq!(id, parsed);
        assert_eq!(id.hex().len(), 56);
        assert_eq!(id.short().len(), 8);
    }

    #[test]
    fn wrong_length_is_refused_with_the_length() {
        let err = NodeId::from_bytes(&[1, 2, 3]).unwrap_err();
        assert_eq!(err.to_string(), "invalid argument: node id must be 28 bytes, got 3");
        assert!("zz".parse::<JobId>().is_err());
    }

    #[test]
    fn an_actors_creation_task_is_known_by_its_actor() {
        let actor = ActorId::random();
        let creation = TaskId::actor_creation(&actor);
        assert!(TaskId::is_actor_creation(creation.as_bytes(), actor.as_bytes()));
        assert!(!TaskId::is_actor_creation(creation.as_bytes(), ActorId::random().as_bytes()));
        assert!(!TaskId::is_actor_creation(TaskId::random().as_bytes(), actor.as_bytes()));
        assert!(!TaskId::is_actor_creation(creation.as_bytes(), &[]));
        assert!(TaskId::names_an_actor_creation(creation.as_bytes()));
        assert!(!TaskId::names_an_actor_creation(TaskId::random().as_bytes()));
        assert!(!TaskId::names_an_actor_creation(&[0xff; 8]), "a short id names nothing");
    }

    #[test]
    fn job_ids_are_sequential() {
        let id = JobId::from_sequence(7);
        assert_eq!(id.sequence(), 7);
        assert_eq!(id.hex(), "00000007");
    }

    #[test]
    fn serde_uses_hex() {
        let id = ActorId::random();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{}\"", id.hex()));
        assert_eq!(serde_json::from_str::<ActorId>(&json).unwrap(), id);
    }
}
