//! `ActorPool`: work spread over a fixed set of actors (Ray's `ray.util.ActorPool`).
//!
//! Each actor runs one submitted call at a time; calls wait, in submission order, for a
//! free actor. Results come back in submission order ([`ActorPool::get_next`],
//! [`ActorPool::map`]) or as they finish ([`ActorPool::get_next_unordered`]).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use ionet_common::{IonetError, IonetResult};
use serde::de::DeserializeOwned;

use crate::object_ref::ObjectRef;

type Call<H, V, R> = Box<dyn FnOnce(&H, V) -> ObjectRef<R>>;

/// A pool over actor handles of type `H` running calls that take a `V` and return `R`.
pub struct ActorPool<H, V, R> {
    idle: Vec<H>,
    /// Calls on an actor: submission index → (its result, the actor).
    running: BTreeMap<usize, (ObjectRef<R>, H)>,
    waiting: VecDeque<(usize, Call<H, V, R>, V)>,
    next_index: usize,
}

impl<H, V, R: DeserializeOwned> ActorPool<H, V, R> {
    pub fn new(actors: impl IntoIterator<Item = H>) -> Self {
        Self { idle: actors.into_iter().collect(), running: BTreeMap::new(), waiting: VecDeque::new(), next_index: 0 }
    }

    /// Runs `call(actor, value)` on a free actor now, or once one is free.
    pub fn submit(&mut self, call: impl FnOnce(&H, V) -> ObjectRef<R> + 'static, value: V) {
        let index = self.next_index;
        self.next_index += 1;
        self.waiting.push_back((index, Box::new(call), value));
        self.start_waiting();
    }

    fn start_waiting(&mut self) {
        while !self.idle.is_empty() {
            let Some((index, call, value)) = self.waiting.pop_front() else { return };
            let actor = self.idle.pop().expect("checked above");
            let result = call(&actor, value);
            self.running.insert(index, (result, actor));
        }
    }

    /// Whether results are still to be returned.
    pub fn has_next(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// Whether an actor is idle with no call waiting for it.
    pub fn has_free(&self) -> bool {
        !self.idle.is_empty() && self.waiting.is_empty()
    }

    /// The oldest result not returned yet (waiting for it), `None` when none is left.
    pub fn get_next(&mut self) -> Option<IonetResult<R>> {
        let (&index, _) = self.running.iter().next()?;
        let (result, actor) = self.running.remove(&index).expect("present");
        let value = crate::api::get(&result);
        self.idle.push(actor);
        self.start_waiting();
        Some(value)
    }

    /// Whichever result finishes first (waiting at most `timeout`: `Err(Timeout)`).
    pub fn get_next_unordered(&mut self, timeout: Option<Duration>) -> Option<IonetResult<R>> {
        if self.running.is_empty() {
            return None;
        }
        let refs: Vec<&ObjectRef<R>> = self.running.values().map(|(result, _)| result).collect();
        let ready = match crate::api::wait_flags(&refs, 1, timeout) {
            Ok(ready) => ready,
            Err(err) => return Some(Err(err)),
        };
        let Some(position) = ready.iter().position(|is_ready| *is_ready) else {
            return Some(Err(IonetError::Timeout("no actor of the pool finished within the timeout".into())));
        };
        let index = *self.running.keys().nth(position).expect("in range");
        let (result, actor) = self.running.remove(&index).expect("present");
        let value = crate::api::get(&result);
        self.idle.push(actor);
        self.start_waiting();
        Some(value)
    }

    /// Results of `call(actor, value)` for each value, in the order of `values`.
    pub fn map<C>(&mut self, call: C, values: impl IntoIterator<Item = V>) -> Vec<IonetResult<R>>
    where
        C: Fn(&H, V) -> ObjectRef<R> + Clone + 'static,
    {
        for value in values {
            self.submit(call.clone(), value);
        }
        std::iter::from_fn(|| self.get_next()).collect()
    }

    /// Takes an idle actor out of the pool.
    pub fn pop_idle(&mut self) -> Option<H> {
        if self.has_free() {
            self.idle.pop()
        } else {
            None
        }
    }

    /// Adds an actor to the pool (it takes the next waiting call, if any).
    pub fn push(&mut self, actor: H) {
        self.idle.push(actor);
        self.start_waiting();
    }
}
