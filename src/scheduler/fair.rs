//! Weighted fair queuing (WFQ) across clients, by virtual time.
//!
//! Every client has a virtual time that grows by `tokens computed for it / its weight`. Waiting
//! sequences are admitted from the client with the smallest virtual time; within a client by
//! `priority` (lower first), then arrival. A client that becomes active again starts at the
//! smallest virtual time among the active ones, so idling earns no credit and no busy client
//! starves a newcomer (nor the other way round).
//!
//! Invariants: a client is in the map while it has a waiting or running sequence, or while its
//! recent (exponentially decayed) served tokens are at least one token; `queue` holds exactly
//! the client's waiting sequences that were not preempted.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::sync::Arc;

use crate::kv::SeqId;

/// Who a request counts against: a short hash of its API key, its `user` field, or "anonymous".
pub type ClientId = Arc<str>;

/// Orders a client's waiting sequences: `(priority, arrival, seq)`.
pub type QueueKey = (i64, u64, SeqId);

/// Served tokens below this, decayed, make an idle client forgotten.
const FORGET_BELOW_TOKENS: f64 = 1.0;

#[derive(Debug, Clone)]
pub struct ClientState {
    pub weight: f64,
    /// Tokens served over weight, shifted forward on re-activation.
    pub vtime: f64,
    /// Waiting sequences, not counting preempted ones (those resume first, whoever owns them).
    pub queue: BTreeSet<QueueKey>,
    /// Waiting sequences, preempted ones included.
    pub waiting: usize,
    pub running: usize,
    /// Served tokens, decayed per step with the configured half-life.
    pub recent_tokens: f64,
}

impl ClientState {
    fn active(&self) -> bool {
        self.waiting + self.running > 0
    }
}

/// One client as `/admin/queue` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClientReport {
    pub client: String,
    pub weight: f64,
    pub waiting: usize,
    pub running: usize,
    pub virtual_time: f64,
    /// Tokens served recently (decayed with `scheduler.fairness_half_life_steps`).
    pub recent_tokens: f64,
}

#[derive(Debug)]
pub struct FairShare {
    weights: HashMap<String, f64>,
    /// Per-step factor of `recent_tokens`.
    decay: f64,
    clients: HashMap<ClientId, ClientState>,
    /// Jain's index after the last step.
    jain: f64,
    /// Tokens served per client since the last `take_served`, for the metrics.
    served: HashMap<ClientId, u64>,
}

/// A `(virtual time, head arrival)` heap entry, smallest first.
#[derive(Debug, PartialEq)]
struct Turn(f64, u64, usize);

impl Eq for Turn {}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Turn {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0
            .total_cmp(&other.0)
            .then(self.1.cmp(&other.1))
            .then(self.2.cmp(&other.2))
    }
}

impl FairShare {
    pub fn new(weights: HashMap<String, f64>, half_life_steps: f64) -> Self {
        Self {
            weights,
            decay: 0.5f64.powf(1.0 / half_life_steps.max(1.0)),
            clients: HashMap::new(),
            jain: 1.0,
            served: HashMap::new(),
        }
    }

    fn weight_of(&self, client: &str) -> f64 {
        self.weights.get(client).copied().unwrap_or(1.0)
    }

    /// The client's state, re-activated at the smallest active virtual time if it had no work.
    fn activate(&mut self, client: &ClientId) -> &mut ClientState {
        let was_active = self.clients.get(client).is_some_and(ClientState::active);
        if !was_active {
            let floor = self
                .clients
                .values()
                .filter(|c| c.active())
                .map(|c| c.vtime)
                .min_by(f64::total_cmp);
            let weight = self.weight_of(client);
            let state = self.clients.entry(client.clone()).or_insert_with(|| ClientState {
                weight,
                vtime: 0.0,
                queue: BTreeSet::new(),
                waiting: 0,
                running: 0,
                recent_tokens: 0.0,
            });
            if let Some(floor) = floor {
                state.vtime = state.vtime.max(floor);
            }
        }
        self.clients.get_mut(client).expect("inserted above")
    }

    /// A new sequence waits.
    pub fn enqueue(&mut self, client: &ClientId, key: QueueKey) {
        let c = self.activate(client);
        c.queue.insert(key);
        c.waiting += 1;
    }

    /// A waiting sequence was admitted (`key` is `None` for a preempted one).
    pub fn admit(&mut self, client: &ClientId, key: Option<QueueKey>) {
        if let Some(c) = self.clients.get_mut(client) {
            if let Some(k) = key {
                c.queue.remove(&k);
            }
            c.waiting = c.waiting.saturating_sub(1);
            c.running += 1;
        }
    }

    /// A running sequence was preempted: it waits again, outside the client's queue.
    pub fn preempt(&mut self, client: &ClientId) {
        if let Some(c) = self.clients.get_mut(client) {
            c.running = c.running.saturating_sub(1);
            c.waiting += 1;
        }
    }

    /// A sequence left (finished, cancelled, failed); `queued` is its key when it waited in the
    /// client's queue, `running` whether it was running.
    pub fn remove(&mut self, client: &ClientId, queued: Option<QueueKey>, running: bool) {
        if let Some(c) = self.clients.get_mut(client) {
            if running {
                c.running = c.running.saturating_sub(1);
            } else {
                c.waiting = c.waiting.saturating_sub(1);
                if let Some(k) = queued {
                    c.queue.remove(&k);
                }
            }
        }
    }

    /// `tokens` were computed for `client` in this step.
    pub fn charge(&mut self, client: &ClientId, tokens: usize) {
        if let Some(c) = self.clients.get_mut(client) {
            c.vtime += tokens as f64 / c.weight;
            c.recent_tokens += tokens as f64;
            *self.served.entry(client.clone()).or_default() += tokens as u64;
        }
    }

    /// Closes a step's accounting: decays recent tokens, forgets idle clients, updates Jain's
    /// index. O(clients).
    pub fn end_step(&mut self) {
        let decay = self.decay;
        for c in self.clients.values_mut() {
            c.recent_tokens *= decay;
        }
        self.clients
            .retain(|_, c| c.active() || c.recent_tokens >= FORGET_BELOW_TOKENS);
        self.jain = jain_index(self.clients.values().map(|c| c.recent_tokens / c.weight));
    }

    /// Jain's fairness index over the clients active recently, of recent tokens over weight.
    pub fn jain(&self) -> f64 {
        self.jain
    }

    /// Tokens served per client since the last call.
    pub fn take_served(&mut self) -> HashMap<ClientId, u64> {
        std::mem::take(&mut self.served)
    }

    /// Every tracked client and its state (for the queue depth gauges).
    pub fn clients(&self) -> impl Iterator<Item = (&ClientId, &ClientState)> {
        self.clients.iter()
    }

    pub fn report(&self) -> Vec<ClientReport> {
        let mut out: Vec<ClientReport> = self
            .clients
            .iter()
            .map(|(id, c)| ClientReport {
                client: id.to_string(),
                weight: c.weight,
                waiting: c.waiting,
                running: c.running,
                virtual_time: c.vtime,
                recent_tokens: c.recent_tokens,
            })
            .collect();
        out.sort_by(|a, b| a.client.cmp(&b.client));
        out
    }

    /// Up to `limit` queued sequences in admission order, without changing anything: take from
    /// the client with the smallest virtual time, advancing a copy of it by `cost(seq) / weight`
    /// after each pick. O(clients + limit · log clients).
    pub fn order(&self, limit: usize, mut cost: impl FnMut(SeqId) -> usize) -> Vec<SeqId> {
        let mut out = Vec::new();
        if limit == 0 {
            return out;
        }
        let mut iters: Vec<(f64, std::collections::btree_set::Iter<'_, QueueKey>)> = Vec::new();
        let mut heap = BinaryHeap::new();
        for c in self.clients.values() {
            if let Some(&(_, arrival, _)) = c.queue.first() {
                heap.push(Reverse(Turn(c.vtime, arrival, iters.len())));
                iters.push((c.weight, c.queue.iter()));
            }
        }
        while out.len() < limit {
            let Some(Reverse(Turn(vtime, _, i))) = heap.pop() else {
                break;
            };
            let (weight, it) = &mut iters[i];
            let Some(&(_, _, seq)) = it.next() else {
                continue;
            };
            out.push(seq);
            let vtime = vtime + cost(seq) as f64 / *weight;
            if let Some(&(_, arrival, _)) = it.clone().next() {
                heap.push(Reverse(Turn(vtime, arrival, i)));
            }
        }
        out
    }
}

/// Jain's index `(Σx)² / (n·Σx²)`: 1 when all are equal, `1/n` when one has everything; 1 for no
/// clients or when nobody was served.
pub fn jain_index(xs: impl Iterator<Item = f64>) -> f64 {
    let (mut n, mut sum, mut squares) = (0usize, 0.0f64, 0.0f64);
    for x in xs {
        n += 1;
        sum += x;
        squares += x * x;
    }
    if n == 0 || squares <= 0.0 {
        1.0
    } else {
        sum * sum / (n as f64 * squares)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ClientId {
        Arc::from(s)
    }

    #[test]
    fn unified_batch_jain_index_bounds() {
        assert_eq!(jain_index([].into_iter()), 1.0);
        assert_eq!(jain_index([3.0, 3.0, 3.0].into_iter()), 1.0);
        assert!((jain_index([1.0, 0.0].into_iter()) - 0.5).abs() < 1e-12);
        assert!((jain_index([1.0, 0.0, 0.0, 0.0].into_iter()) - 0.25).abs() < 1e-12);
    }

    #[test]
    fn unified_batch_wfq_interleaves_by_weight_and_late_client_gets_no_debt() {
        let weights = HashMap::from([("heavy".to_string(), 2.0)]);
        let mut fair = FairShare::new(weights, 16.0);
        let (a, b) = (id("heavy"), id("light"));
        // `heavy` has served a lot before `light` shows up.
        fair.enqueue(&a, (0, 0, SeqId(100)));
        fair.admit(&a, Some((0, 0, SeqId(100))));
        fair.charge(&a, 1000);
        for i in 0..6 {
            fair.enqueue(&a, (0, 1 + i, SeqId(i)));
            fair.enqueue(&b, (0, 10 + i, SeqId(10 + i)));
        }
        // Same cost per sequence: heavy gets two turns for light's one, and light starts level.
        let order = fair.order(6, |_| 10);
        let heavy = order.iter().filter(|s| s.0 < 10).count();
        assert_eq!(heavy, 4, "{order:?}");
        assert_eq!(order.len(), 6);
    }

    #[test]
    fn unified_batch_priority_orders_within_a_client() {
        let mut fair = FairShare::new(HashMap::new(), 16.0);
        let a = id("a");
        fair.enqueue(&a, (0, 0, SeqId(1)));
        fair.enqueue(&a, (-5, 1, SeqId(2)));
        fair.enqueue(&a, (3, 2, SeqId(3)));
        assert_eq!(fair.order(3, |_| 1), vec![SeqId(2), SeqId(1), SeqId(3)]);
    }
}
