//! [`LocalCommunicator`]: the ranks are threads of one process (as torch's gloo serves CPU
//! tests). A collective is one exchange: every rank puts its buffer in its slot, the last one in
//! publishes all of them, and each rank reduces the published buffers itself, in rank order, so
//! every rank computes the same bits.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::comm::{CommError, Communicator};

struct State {
    /// This round's buffers, by rank.
    slots: Vec<Option<Vec<f32>>>,
    arrived: usize,
    /// Rounds completed; a waiting rank leaves when it moves on.
    round: u64,
    /// The last completed round's buffers. A rank can only enter round `n + 1` after reading
    /// round `n`'s, so round `n + 1` cannot complete (and replace this) before all have read it.
    published: Arc<Vec<Vec<f32>>>,
    poisoned: Option<CommError>,
}

struct Shared {
    size: usize,
    timeout: Option<Duration>,
    state: Mutex<State>,
    changed: Condvar,
}

/// One rank's handle on an in-process group. Dropping a handle (its thread ended, or unwound
/// from a panic) poisons the group, so the others get an error instead of waiting forever.
pub struct LocalCommunicator {
    rank: usize,
    shared: Arc<Shared>,
}

impl LocalCommunicator {
    /// The `size` handles of a new group, by rank. With a `timeout`, a rank that waits longer
    /// than that for the others poisons the group.
    pub fn group(size: usize, timeout: Option<Duration>) -> Vec<LocalCommunicator> {
        assert!(size > 0, "a group has at least one rank");
        let shared = Arc::new(Shared {
            size,
            timeout,
            state: Mutex::new(State {
                slots: vec![None; size],
                arrived: 0,
                round: 0,
                published: Arc::new(Vec::new()),
                poisoned: None,
            }),
            changed: Condvar::new(),
        });
        (0..size)
            .map(|rank| LocalCommunicator {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic never happens while the lock is held, but a poisoned mutex is still usable.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Deposits `data` and returns every rank's buffer of this round, by rank.
    fn exchange(&self, data: Vec<f32>) -> Result<Arc<Vec<Vec<f32>>>, CommError> {
        let mut state = self.lock();
        if let Some(e) = &state.poisoned {
            return Err(e.clone());
        }
        state.slots[self.rank] = Some(data);
        state.arrived += 1;
        if state.arrived == self.shared.size {
            let all: Vec<Vec<f32>> = state
                .slots
                .iter_mut()
                .map(|s| s.take().unwrap_or_default())
                .collect();
            state.published = Arc::new(all);
            state.arrived = 0;
            state.round += 1;
            self.shared.changed.notify_all();
            return Ok(state.published.clone());
        }
        let round = state.round;
        let deadline = self.shared.timeout.map(|t| Instant::now() + t);
        while state.round == round && state.poisoned.is_none() {
            match deadline {
                None => {
                    state = self.shared.changed.wait(state).unwrap_or_else(|p| p.into_inner());
                }
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        let e = CommError::Timeout(self.shared.timeout.unwrap_or_default());
                        state.poisoned = Some(e.clone());
                        self.shared.changed.notify_all();
                        return Err(e);
                    }
                    state = self
                        .shared
                        .changed
                        .wait_timeout(state, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        if state.round == round {
            return Err(state.poisoned.clone().expect("left the wait poisoned"));
        }
        Ok(state.published.clone())
    }

    fn check_lengths(&self, all: &[Vec<f32>]) -> Result<(), CommError> {
        let want = all[0].len();
        match all.iter().position(|b| b.len() != want) {
            Some(rank) => Err(CommError::Length {
                rank,
                got: all[rank].len(),
                want,
            }),
            None => Ok(()),
        }
    }
}

impl Communicator for LocalCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        let all = self.exchange(buf.to_vec())?;
        self.check_lengths(&all)?;
        buf.copy_from_slice(&all[0]);
        for other in &all[1..] {
            for (a, b) in buf.iter_mut().zip(other) {
                *a += *b;
            }
        }
        Ok(())
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError> {
        let all = self.exchange(local.to_vec())?;
        self.check_lengths(&all)?;
        Ok(all.concat())
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        let mine = if self.rank == root {
            buf.to_vec()
        } else {
            Vec::new()
        };
        let all = self.exchange(mine)?;
        let from = &all[root];
        if from.len() != buf.len() {
            return Err(CommError::Length {
                rank: root,
                got: from.len(),
                want: buf.len(),
            });
        }
        buf.copy_from_slice(from);
        Ok(())
    }

    fn poison(&self, reason: &str) {
        let mut state = self.lock();
        if state.poisoned.is_none() {
            state.poisoned = Some(CommError::Poisoned {
                rank: self.rank,
                reason: reason.to_string(),
            });
        }
        self.shared.changed.notify_all();
    }

    fn reset(&self) {
        let mut state = self.lock();
        state.poisoned = None;
        state.arrived = 0;
        state.slots.iter_mut().for_each(|s| *s = None);
    }
}

impl Drop for LocalCommunicator {
    fn drop(&mut self) {
        if self.shared.size > 1 {
            self.poison("its communicator was dropped (the rank ended)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<T: Send + 'static>(
        size: usize,
        f: impl Fn(LocalCommunicator) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let handles: Vec<_> = LocalCommunicator::group(size, Some(Duration::from_secs(10)))
            .into_iter()
            .map(|c| {
                let f = f.clone();
                std::thread::spawn(move || f(c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn parallel_local_all_reduce_sums_in_rank_order_on_every_rank() {
        // 1e8 + 1 - 1e8 in f32: 0 summed in rank order, 1 in the reverse order; every rank
        // must get the rank-order bits.
        let out = run(3, |c| {
            let v = [1e8f32, 1.0, -1e8][c.rank()];
            let mut buf = vec![v, c.rank() as f32];
            for _ in 0..50 {
                let mut b = buf.clone();
                c.all_reduce_sum(&mut b).unwrap();
                assert_eq!(b, vec![0.0, 3.0]);
            }
            c.all_reduce_sum(&mut buf).unwrap();
            buf
        });
        assert!(out.iter().all(|b| b == &out[0]));
        assert_eq!(out[0], vec![(1e8f32 + 1.0) - 1e8, 3.0]);
    }

    #[test]
    fn parallel_local_all_gather_and_broadcast() {
        let out = run(4, |c| {
            let g = c.all_gather(&[c.rank() as f32, 10.0]).unwrap();
            let mut b = vec![c.rank() as f32; 3];
            c.broadcast(&mut b, 2).unwrap();
            (g, b)
        });
        for (g, b) in out {
            assert_eq!(g, vec![0.0, 10.0, 1.0, 10.0, 2.0, 10.0, 3.0, 10.0]);
            assert_eq!(b, vec![2.0; 3]);
        }
    }

    #[test]
    fn parallel_local_dead_rank_errors_instead_of_hanging() {
        let mut group = LocalCommunicator::group(3, None);
        let dead = group.pop().unwrap();
        let live: Vec<_> = group
            .into_iter()
            .map(|c| std::thread::spawn(move || c.all_reduce_sum(&mut [1.0])))
            .collect();
        // Rank 2's thread "panics": its handle is dropped mid-step.
        std::thread::spawn(move || {
            let _c = dead;
            panic!("rank 2 failed");
        })
        .join()
        .unwrap_err();
        for h in live {
            assert!(matches!(
                h.join().unwrap(),
                Err(CommError::Poisoned { rank: 2, .. })
            ));
        }
    }

    #[test]
    fn parallel_local_timeout_poisons_and_reset_recovers() {
        let group = LocalCommunicator::group(2, Some(Duration::from_millis(50)));
        assert_eq!(
            group[0].all_reduce_sum(&mut [1.0]),
            Err(CommError::Timeout(Duration::from_millis(50)))
        );
        assert!(
            group[1].all_reduce_sum(&mut [1.0]).is_err(),
            "poisoned for every rank"
        );
        group[0].reset();
        let mut it = group.into_iter();
        let (a, b) = (it.next().unwrap(), it.next().unwrap());
        let t = std::thread::spawn(move || {
            let mut buf = [2.0];
            b.all_reduce_sum(&mut buf).map(|_| buf[0])
        });
        let mut buf = [1.0];
        a.all_reduce_sum(&mut buf).unwrap();
        assert_eq!((buf[0], t.join().unwrap()), (3.0, Ok(3.0)));
    }
}
