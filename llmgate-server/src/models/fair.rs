//! A busy model's places and the requests waiting for one: [`FairQueue`].
//!
//! A model with `max_concurrency` has that many places. While one is free a request
//! takes it with one atomic operation, no lock and no allocation. When none is free the
//! request waits, and a place that frees goes straight to the next waiter, chosen by
//! the model's [`QueuePolicy`]:
//!
//! - `fair`: start-time fair queuing between keys. Each waiting request gets a start tag
//!   when it arrives, the later of the queue's virtual time (the tag of the request
//!   served last) and the end of its key's previous request; a request of a key of
//!   weight w lasts 1/w in that time. The smallest tag is served next, ties in arrival
//!   order. So each key's requests keep their order, a key of weight 3 is served three
//!   times for another's once while both wait, and a key that sends one request at a
//!   time is served after at most one request of each other key waiting, however many
//!   those keep queued: a key that was away has no credit saved up, and one that keeps
//!   many waiting has its later requests' tags far ahead.
//! - `fifo`: arrival order, whoever sent them.
//!
//! A waiting request whose client leaves is taken out of the queue (its future is
//! dropped); one that was handed a place and is dropped before it took it passes the
//! place on.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use http::Extensions;
use llmgate_core::auth::Caller;
use llmgate_core::config::QueuePolicy;

/// In [`FairQueue::state`]: requests are waiting, so no place is free and a place that
/// frees goes to one of them, under the lock.
const WAITING: u32 = 1 << 31;

/// The places a model can have: the bits below [`WAITING`].
const MAX_PLACES: u32 = WAITING - 1;

/// The virtual time one request of a key of weight 1 lasts; weight w: `TURN / w`. Large
/// enough that the largest weight still lasts over a thousand, so weights keep their
/// ratios; small enough that the clock cannot overflow in practice (2^44 requests).
const TURN: u64 = 1 << 20;

/// Who asks for a place: the key (from the request's [`Caller`]) and its weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requester {
    /// The key's id; empty for a request without a caller.
    pub key_id: String,
    /// Its share against other keys waiting (at least 1).
    pub weight: u32,
}

impl Requester {
    /// The caller of a request; a request without one (it did not go through the
    /// metering layer) waits as one anonymous key of weight 1.
    pub fn of(extensions: &Extensions) -> Self {
        match extensions.get::<Caller>() {
            Some(caller) => Self {
                key_id: caller.key_id.clone(),
                weight: caller.weight,
            },
            None => Self::anonymous(),
        }
    }

    /// The one key of requests without a caller.
    pub fn anonymous() -> Self {
        Self {
            key_id: String::new(),
            weight: 1,
        }
    }
}

/// A model's places and its waiting requests (see the [module docs](self)).
#[derive(Debug)]
pub(crate) struct FairQueue {
    /// Free places, or [`WAITING`] (then no place is free). Changes only by
    /// compare-and-swap without the lock, and only under it once `WAITING` is set.
    state: AtomicU32,
    policy: QueuePolicy,
    waiting: Mutex<Waiting>,
}

/// The requests waiting, in the order they will be served.
#[derive(Debug, Default)]
struct Waiting {
    /// The first is served next. Not empty exactly when [`WAITING`] is set.
    queue: BTreeMap<Ticket, Option<Waker>>,
    /// The start tag of the request served last.
    clock: u64,
    /// Each key's end of its latest request in virtual time: where its next one starts
    /// at the earliest. A tag at or before `clock` says nothing more than no entry, so
    /// those are dropped from time to time: the map holds the keys that waited lately.
    ends: HashMap<String, u64>,
    /// Size of `ends` at which the stale entries are dropped.
    prune_at: usize,
    /// Requests that ever waited: the tie-break.
    arrivals: u64,
}

/// A waiting request's place in the order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Ticket {
    /// Start tag (always 0 under `fifo`).
    start: u64,
    /// Arrival number.
    arrival: u64,
}

impl FairQueue {
    /// `places` requests at once (at most 2^31 − 1), waiters served by `policy`.
    pub(crate) fn new(places: u32, policy: QueuePolicy) -> Self {
        Self {
            state: AtomicU32::new(places.min(MAX_PLACES)),
            policy,
            waiting: Mutex::new(Waiting {
                prune_at: 64,
                ..Waiting::default()
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A free place, if there is one and nobody waits for it.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            // With `WAITING` set the count is 0: a place that frees is a waiter's.
            if current & MAX_PLACES == 0 {
                return None;
            }
            match self.state.compare_exchange_weak(
                current,
                current - 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(Permit(self.clone())),
                Err(now) => current = now,
            }
        }
    }

    /// A place for `requester`: at once if one is free and nobody waits, else in turn.
    /// Dropping the future leaves the queue.
    pub(crate) fn acquire(self: &Arc<Self>, requester: &Requester) -> Acquire {
        let mut waiting = self.lock();
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            let next = if current & MAX_PLACES > 0 {
                current - 1
            } else if current == WAITING {
                break;
            } else {
                WAITING
            };
            match self.state.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) if next == WAITING => break,
                Ok(_) => return Acquire(Stage::Free(Some(Permit(self.clone())))),
                Err(now) => current = now,
            }
        }
        let arrival = waiting.arrivals;
        waiting.arrivals += 1;
        let (ticket, end) = match self.policy {
            QueuePolicy::Fifo => (Ticket { start: 0, arrival }, 0),
            QueuePolicy::Fair => {
                let clock = waiting.clock;
                let lasts = TURN / u64::from(requester.weight.max(1));
                let key_end = waiting.ends.entry(requester.key_id.clone()).or_default();
                let start = (*key_end).max(clock);
                *key_end = start.saturating_add(lasts);
                (Ticket { start, arrival }, *key_end)
            }
        };
        waiting.queue.insert(ticket, None);
        Acquire(Stage::Queued {
            queue: self.clone(),
            ticket,
            key_id: requester.key_id.clone(),
            end,
        })
    }

    /// A place is free: it goes to the next waiter, or back to the free count. Returns
    /// the waiter to wake, to be woken once the lock is let go.
    fn hand_on(&self, waiting: &mut Waiting) -> Option<Waker> {
        let Some((ticket, waker)) = waiting.queue.pop_first() else {
            self.state.fetch_add(1, Ordering::AcqRel);
            return None;
        };
        waiting.clock = waiting.clock.max(ticket.start);
        if waiting.queue.is_empty() {
            // The place went to the last waiter: none free, none waiting.
            self.state.store(0, Ordering::Release);
        }
        if waiting.ends.len() >= waiting.prune_at {
            let clock = waiting.clock;
            waiting.ends.retain(|_, end| *end > clock);
            waiting.prune_at = (waiting.ends.len() * 2).max(64);
        }
        waker
    }

    fn release(&self) {
        let mut current = self.state.load(Ordering::Acquire);
        while current & WAITING == 0 {
            match self.state.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(now) => current = now,
            }
        }
        let waker = self.hand_on(&mut self.lock());
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Requests waiting for a place.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.lock().queue.len()
    }
}

/// One of a model's places, given back when dropped.
#[derive(Debug)]
pub(crate) struct Permit(Arc<FairQueue>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// [`FairQueue::acquire`]'s future.
#[derive(Debug)]
pub(crate) struct Acquire(Stage);

#[derive(Debug)]
enum Stage {
    /// A place was free.
    Free(Option<Permit>),
    /// Waiting in the queue.
    Queued {
        queue: Arc<FairQueue>,
        ticket: Ticket,
        key_id: String,
        /// Its key's end after it (fair queuing).
        end: u64,
    },
    /// Its place was taken.
    Done,
}

impl Future for Acquire {
    type Output = Permit;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Permit> {
        let stage = &mut self.get_mut().0;
        let permit = match stage {
            Stage::Free(permit) => permit.take(),
            Stage::Queued { queue, ticket, .. } => {
                let mut waiting = queue.lock();
                match waiting.queue.get_mut(ticket) {
                    Some(waker) => {
                        if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                            *waker = Some(cx.waker().clone());
                        }
                        return Poll::Pending;
                    }
                    // `hand_on` took it out of the queue: the place is this request's.
                    None => Some(Permit(queue.clone())),
                }
            }
            Stage::Done => None,
        };
        *stage = Stage::Done;
        Poll::Ready(permit.expect("`Acquire` polled after it completed"))
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        let Stage::Queued {
            queue,
            ticket,
            key_id,
            end,
        } = &self.0
        else {
            return;
        };
        let mut waiting = queue.lock();
        if waiting.queue.remove(ticket).is_some() {
            if waiting.queue.is_empty() {
                queue.state.store(0, Ordering::Release);
            }
            // When it was its key's latest, the key's next request starts where this
            // one would have: leaving costs the key no turn.
            if let Some(key_end) = waiting.ends.get_mut(key_id.as_str()) {
                if *key_end == *end {
                    *key_end = ticket.start;
                }
            }
            return;
        }
        // Handed a place it will not use: the next waiter's.
        let waker = queue.hand_on(&mut waiting);
        drop(waiting);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;
    use std::time::Duration;

    use super::*;

    fn key(name: &str, weight: u32) -> Requester {
        Requester {
            key_id: name.into(),
            weight,
        }
    }

    /// Polls once: the place, if it has one now.
    fn poll(acquire: &mut Acquire) -> Option<Permit> {
        match Pin::new(acquire).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(permit) => Some(permit),
            Poll::Pending => None,
        }
    }

    /// With one place held, `asks` wait in that order; then each freed place goes to
    /// the next: the order in which they are served, by name.
    fn served_order(policy: QueuePolicy, asks: &[(&str, u32)]) -> Vec<String> {
        served_order_in(&Arc::new(FairQueue::new(1, policy)), asks)
    }

    fn served_order_in(queue: &Arc<FairQueue>, asks: &[(&str, u32)]) -> Vec<String> {
        let mut held = queue.try_acquire().expect("a free place");
        let mut waiting: Vec<(String, Acquire)> = asks
            .iter()
            .map(|(name, weight)| {
                let mut acquire = queue.acquire(&key(name, *weight));
                assert!(poll(&mut acquire).is_none(), "the place is taken");
                (name.to_string(), acquire)
            })
            .collect();
        let mut order = Vec::new();
        while !waiting.is_empty() {
            drop(held);
            let ready: Vec<usize> = (0..waiting.len())
                .filter(|&i| {
                    let Stage::Queued { queue, ticket, .. } = &waiting[i].1 .0 else {
                        return true;
                    };
                    !queue.lock().queue.contains_key(ticket)
                })
                .collect();
            assert_eq!(ready.len(), 1, "a freed place goes to exactly one waiter");
            let (name, mut acquire) = waiting.remove(ready[0]);
            held = poll(&mut acquire).expect("its place");
            order.push(name);
        }
        order
    }

    #[test]
    fn a_key_asking_once_is_served_after_one_request_of_a_key_with_many_waiting() {
        let asks = [("a", 1), ("a", 1), ("a", 1), ("a", 1), ("b", 1)];
        assert_eq!(
            served_order(QueuePolicy::Fair, &asks),
            ["a", "b", "a", "a", "a"]
        );
        assert_eq!(
            served_order(QueuePolicy::Fifo, &asks),
            ["a", "a", "a", "a", "b"],
            "fifo: in arrival order"
        );
    }

    #[test]
    fn keys_take_turns_by_weight_each_in_its_own_order() {
        let mut asks = vec![("heavy", 3); 9];
        asks.extend([("light", 1); 3]);
        let order = served_order(QueuePolicy::Fair, &asks);
        // Both waiting all along: three of `heavy` for each of `light`.
        assert_eq!(
            order,
            [
                "heavy", "light", "heavy", "heavy", "heavy", "light", "heavy", "heavy", "heavy",
                "light", "heavy", "heavy"
            ]
        );
    }

    #[test]
    fn a_key_that_was_away_has_no_turns_saved_up() {
        let queue = Arc::new(FairQueue::new(1, QueuePolicy::Fair));
        // `b` waits alone for a long time: ten turns.
        for _ in 0..10 {
            let held = queue.try_acquire().unwrap();
            let mut b = queue.acquire(&key("b", 1));
            drop(held);
            drop(poll(&mut b).unwrap());
        }
        // Then `a` comes back: it does not get ten turns in a row, nor does `b` lose
        // its turns for having had them alone.
        let asks = [("b", 1), ("b", 1), ("b", 1), ("a", 1), ("a", 1), ("a", 1)];
        let order = served_order_in(&queue, &asks);
        assert_eq!(order, ["a", "b", "a", "b", "a", "b"]);
    }

    #[test]
    fn a_place_freed_while_nobody_waits_is_kept_and_waiters_go_before_newcomers() {
        let queue = Arc::new(FairQueue::new(2, QueuePolicy::Fair));
        let one = queue.try_acquire().unwrap();
        let two = queue.try_acquire().unwrap();
        assert!(queue.try_acquire().is_none(), "two places");
        drop(one);
        let mut three = queue.acquire(&key("a", 1));
        let three = poll(&mut three).expect("the freed place was kept");

        let mut waiter = queue.acquire(&key("a", 1));
        assert!(poll(&mut waiter).is_none());
        drop(two);
        assert!(
            queue.try_acquire().is_none(),
            "the freed place went to the waiter, not to one who did not wait"
        );
        let four = poll(&mut waiter).expect("handed the place");
        drop((three, four));
        let both = (queue.try_acquire(), queue.try_acquire());
        assert!(both.0.is_some() && both.1.is_some(), "both places back");
        assert!(queue.try_acquire().is_none());
    }

    #[test]
    fn a_waiter_that_leaves_is_taken_out_and_a_place_it_was_handed_goes_on() {
        let queue = Arc::new(FairQueue::new(1, QueuePolicy::Fair));
        let held = queue.try_acquire().unwrap();
        let mut gone = queue.acquire(&key("a", 1));
        let handed = queue.acquire(&key("b", 1));
        let mut next = queue.acquire(&key("c", 1));
        assert!(poll(&mut gone).is_none());
        assert_eq!(queue.waiting(), 3);
        drop(gone);
        assert_eq!(queue.waiting(), 2, "the client left: out of the queue");

        drop(held);
        // `handed` was given the place but is dropped before it takes it.
        drop(handed);
        let permit = poll(&mut next).expect("the place went on");
        assert_eq!(queue.waiting(), 0);
        drop(permit);
        assert!(queue.try_acquire().is_some(), "and came back");
    }

    #[test]
    fn the_key_is_the_callers_and_a_request_without_one_is_anonymous() {
        let mut extensions = Extensions::new();
        assert_eq!(Requester::of(&extensions), Requester::anonymous());
        extensions.insert(Caller {
            key_id: "key_1".into(),
            name: "bob".into(),
            role: llmgate_core::auth::Role::User,
            weight: 3,
        });
        assert_eq!(Requester::of(&extensions), key("key_1", 3));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn under_contention_no_place_is_lost_or_given_twice() {
        let places = 3;
        let queue = Arc::new(FairQueue::new(places, QueuePolicy::Fair));
        let in_use = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let tasks: Vec<_> = (0..32)
            .map(|task| {
                let (queue, in_use) = (queue.clone(), in_use.clone());
                tokio::spawn(async move {
                    let who = key(&format!("k{}", task % 5), task % 3 + 1);
                    let mut served = 0;
                    for round in 0..200u32 {
                        let permit = match queue.try_acquire() {
                            Some(permit) => permit,
                            None if round % 7 == 0 => {
                                // A client that gives up soon: leaves the queue.
                                let wait = Duration::from_micros(50);
                                match tokio::time::timeout(wait, queue.acquire(&who)).await {
                                    Ok(permit) => permit,
                                    Err(_) => continue,
                                }
                            }
                            None => queue.acquire(&who).await,
                        };
                        let now = in_use.fetch_add(1, Ordering::SeqCst) + 1;
                        assert!(now <= places, "{now} places in use of {places}");
                        tokio::task::yield_now().await;
                        in_use.fetch_sub(1, Ordering::SeqCst);
                        drop(permit);
                        served += 1;
                    }
                    served
                })
            })
            .collect();
        let mut served = 0;
        for task in tasks {
            served += tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("no waiter is left waiting for a free place")
                .unwrap();
        }
        assert!(served > 32 * 150, "{served}");
        assert_eq!(queue.waiting(), 0);
        let all: Vec<_> = (0..places).filter_map(|_| queue.try_acquire()).collect();
        assert_eq!(all.len(), places as usize, "every place is back");
    }
}
