//! What this process holds and why, for `ionet memory` (`CoreWorker/ListReferences`):
//! one read-only pass over the owner table, the borrows and the actors' arguments. A
//! handle is counted once wherever it lives; what the program holds is what is left
//! after the lends out, the values that capture it and the actors' arguments.

use std::collections::HashMap;

use ionet_common::rpc::proto::worker::{ListReferencesReply, ReferenceRow};
use ionet_common::ObjectId;

use crate::owner::ObjectState;
use crate::runtime::CoreWorker;

/// The most rows one answer carries.
pub(crate) const MAX_ROWS: usize = 10_000;

/// Why an owned object with these counts is alive, in Ray's words where Ray has them.
fn owned_reason(handles: usize, lent: usize, captured: usize, actor_args: usize) -> &'static str {
    let local = handles.saturating_sub(lent + captured + actor_args);
    if local > 0 {
        "LOCAL_REFERENCE"
    } else if captured > 0 {
        "CAPTURED_IN_OBJECT"
    } else if actor_args > 0 {
        "ACTOR_ARGUMENT"
    } else if lent > 0 {
        "LENT"
    } else {
        "LOCAL_REFERENCE"
    }
}

fn saturate(count: usize) -> u32 {
    u32::try_from(count).unwrap_or(u32::MAX)
}

impl CoreWorker {
    /// This process's references, largest objects first, at most `limit` (and
    /// [`MAX_ROWS`]).
    pub(crate) fn references(&self, limit: usize) -> ListReferencesReply {
        let limit = limit.clamp(1, MAX_ROWS);
        let census = self.borrows.census();
        let mut actor_args: HashMap<ObjectId, usize> = HashMap::new();
        for held in self.actor_args.iter() {
            for handle in held.value() {
                *actor_args.entry(handle.id()).or_default() += 1;
            }
        }
        let count = |map: &HashMap<ObjectId, usize>, id: &ObjectId| map.get(id).copied().unwrap_or(0);
        let mut rows: Vec<ReferenceRow> = self
            .objects
            .snapshot()
            .into_iter()
            .map(|(id, state, handles)| {
                let (lent, captured, args) =
                    (count(&census.lent, &id), count(&census.captured, &id), count(&actor_args, &id));
                let (state_name, size, node_address) = match &state {
                    ObjectState::Pending => ("PENDING", 0, String::new()),
                    ObjectState::Inline(bytes) => ("INLINE", bytes.len() as u64, String::new()),
                    ObjectState::Stored(stored) => ("IN_STORE", stored.size, stored.node_address.clone()),
                    ObjectState::Failed(_) => ("FAILED", 0, String::new()),
                };
                ReferenceRow {
                    object_id: id.to_vec(),
                    reference_type: owned_reason(handles, lent, captured, args).into(),
                    size,
                    state: state_name.into(),
                    owned: true,
                    owner_address: String::new(),
                    node_address,
                    handles: saturate(handles),
                    lent: saturate(lent),
                }
            })
            .collect();
        rows.extend(census.borrowed.into_iter().map(|(id, owner, handles)| ReferenceRow {
            object_id: id.to_vec(),
            reference_type: "BORROWED".into(),
            size: 0,
            state: String::new(),
            owned: false,
            owner_address: owner.to_string(),
            node_address: String::new(),
            handles: saturate(handles),
            lent: saturate(count(&census.lent, &id)),
        }));
        let truncated = rows.len() > limit;
        rows.sort_unstable_by(|a, b| b.size.cmp(&a.size).then_with(|| a.object_id.cmp(&b.object_id)));
        rows.truncate(limit);
        ListReferencesReply {
            rows,
            pid: std::process::id(),
            driver: !self.is_worker,
            node_id: self.node_id.to_vec(),
            job_id: self.job_id.to_vec(),
            truncated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::owned_reason;

    #[test]
    fn an_object_is_alive_for_what_holds_it_beyond_the_others() {
        assert_eq!(owned_reason(1, 0, 0, 0), "LOCAL_REFERENCE");
        assert_eq!(owned_reason(3, 1, 1, 0), "LOCAL_REFERENCE");
        assert_eq!(owned_reason(2, 1, 1, 0), "CAPTURED_IN_OBJECT");
        assert_eq!(owned_reason(1, 0, 0, 1), "ACTOR_ARGUMENT");
        assert_eq!(owned_reason(2, 2, 0, 0), "LENT");
    }
}
