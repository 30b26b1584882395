//! The pure rules of actor calls, applied by `actor_client` (no I/O, no clock):
//!
//! - **Incarnations.** [`dead_through`] reads an actor's row for the newest incarnation
//!   known to be gone. A caller keeps the maximum it has learnt, and sends only to a newer
//!   incarnation, so a call never goes to a worker known dead, and a row seen late (rows
//!   arrive in any order) never marks the live incarnation dead (property-tested).
//! - **Delivery.** [`never_delivered`] tells a send that certainly never reached the
//!   worker (the connection could not be made) from one that may have: read from the
//!   error's type down its source chain, never from its text.
//! - **Retry.** [`after_break`] decides what becomes of a call its broken stream left
//!   unanswered: one never delivered goes again without spending an attempt (nothing ran);
//!   one that may have run goes again while attempts remain (`max_task_retries`, `-1`:
//!   for ever), then fails (property-tested).

use ionet_common::rpc::proto::gcs::ActorState;

/// The newest incarnation an actor's row shows to be gone (`None`: the row shows none).
/// A live incarnation `n` means every earlier one is gone; a restarting row records the
/// incarnation to come, so the one before it is gone; a dead row records the last one.
pub(crate) fn dead_through(state: ActorState, incarnation: u32) -> Option<i64> {
    let incarnation = i64::from(incarnation);
    match state {
        ActorState::Alive | ActorState::Restarting => Some(incarnation - 1),
        ActorState::Dead => Some(incarnation),
        _ => None,
    }
}

/// Whether a call on a broken stream reached the actor's worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Certainly not: the connection was never made.
    Never,
    /// Perhaps: it may have run, in part or whole.
    Maybe,
}

/// What becomes of a call its broken stream left unanswered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AfterBreak {
    /// Sent again, to the next incarnation, as attempt `attempt`.
    Resend { attempt: u32 },
    /// It fails (`ActorDied`, or the error the actor died of).
    Fail,
}

/// The rule for a call on attempt `attempt` (0: its first) whose stream broke.
pub(crate) fn after_break(delivery: Delivery, attempt: u32, max_task_retries: i64) -> AfterBreak {
    match delivery {
        Delivery::Never => AfterBreak::Resend { attempt },
        Delivery::Maybe if max_task_retries == -1 || i64::from(attempt) < max_task_retries => {
            AfterBreak::Resend { attempt: attempt + 1 }
        }
        Delivery::Maybe => AfterBreak::Fail,
    }
}

/// Whether a failed send certainly never reached the worker (nothing ran): its cause,
/// somewhere down the error's source chain, is a connection that could not be made
/// (refused, host or network unreachable). Read from the error's type, not its text: a
/// worker's own error that says "connection refused" was delivered. (A connect that timed
/// out is not counted: the peer may have taken the call.)
pub(crate) fn never_delivered(status: &tonic::Status) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(error) = cause {
        if error.downcast_ref::<std::io::Error>().is_some_and(|io| {
            use std::io::ErrorKind::{AddrNotAvailable, ConnectionRefused, HostUnreachable, NetworkUnreachable};
            matches!(io.kind(), ConnectionRefused | HostUnreachable | NetworkUnreachable | AddrNotAvailable)
        }) {
            return true;
        }
        cause = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ionet_common::rpc::CoreWorkerClient;
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever the breaks, a call that may have run is sent again exactly
        /// `max_task_retries` times (for ever with -1), and breaks before delivery cost
        /// nothing.
        #[test]
        fn a_call_runs_at_most_its_retries_plus_one(
            breaks in proptest::collection::vec(any::<bool>(), 0..40),
            retries in -1i64..6,
        ) {
            let mut attempt = 0u32;
            let mut maybe_ran = 0i64;
            let mut failed = false;
            for delivered in breaks {
                let delivery = if delivered { Delivery::Maybe } else { Delivery::Never };
                maybe_ran += i64::from(delivered);
                match after_break(delivery, attempt, retries) {
                    AfterBreak::Resend { attempt: next } => {
                        prop_assert_eq!(next, attempt + u32::from(delivered), "only a delivered call spends an attempt");
                        attempt = next;
                    }
                    AfterBreak::Fail => {
                        prop_assert!(delivered, "a call never delivered is never failed for it");
                        prop_assert_eq!(maybe_ran, retries + 1, "it ran once and then each retry");
                        failed = true;
                        break;
                    }
                }
            }
            if !failed {
                prop_assert!(retries == -1 || maybe_ran <= retries, "{} runs with {} retries", maybe_ran, retries);
            }
        }

        /// Rows seen in any order, each a true snapshot of an actor now alive in
        /// incarnation `live`, never mark `live` dead; and its own live row marks every
        /// earlier one dead.
        #[test]
        fn late_rows_never_kill_the_live_incarnation(
            live in 0u32..8,
            seen in proptest::collection::vec((0u32..8, any::<bool>()), 0..20),
        ) {
            let mut dead = -1i64;
            for (incarnation, restarting) in seen {
                let incarnation = incarnation.min(live);
                // A snapshot from the past: alive in `incarnation`, or restarting into it.
                let state = if restarting && incarnation > 0 { ActorState::Restarting } else { ActorState::Alive };
                dead = dead.max(dead_through(state, incarnation).unwrap());
            }
            prop_assert!(dead < i64::from(live));
            dead = dead.max(dead_through(ActorState::Alive, live).unwrap());
            prop_assert_eq!(dead, i64::from(live) - 1);
            prop_assert_eq!(dead_through(ActorState::Dead, live), Some(i64::from(live)));
            prop_assert_eq!(dead_through(ActorState::PendingCreation, live), None);
        }
    }

    #[test]
    fn a_refused_connection_is_never_delivered_and_a_message_proves_nothing() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            // A port nothing listens on.
            let address = {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                listener.local_addr().unwrap().to_string()
            };
            let credential = ionet_common::auth::Bearer::new("credential").unwrap();
            let channel = ionet_common::rpc::connect_lazy(&address, &credential, Duration::from_secs(2)).unwrap();
            let refused = CoreWorkerClient::new(channel)
                .watch(ionet_common::rpc::proto::worker::WatchRequest::default())
                .await
                .expect_err("nothing listens there");
            assert!(never_delivered(&refused), "a refused connection: {refused:?}");
        });
        // A worker that answered, whatever its words, got the call.
        assert!(!never_delivered(&tonic::Status::unavailable("tcp connect error: Connection refused")));
    }
}
