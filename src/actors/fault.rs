//! Test-only fault injection into the model executor, to exercise supervision and shutdown.
//!
//! A runtime switch rather than a cargo feature (a feature would build the crate twice): it
//! exists only when the process starts with `INFERFLUX_FAULT_INJECTION=1`, and `POST
//! /admin/fault` arms it. Without the variable the route answers 404 and the executor never
//! looks at it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The environment variable that enables the hook at start.
pub const FAULT_INJECTION_ENV: &str = "INFERFLUX_FAULT_INJECTION";

/// How the executor fails when an armed fault comes due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultKind {
    /// Panics outside the step's own `catch_unwind`: the executor thread dies.
    Panic,
    /// The step returns an error, as a device error would.
    Error,
}

#[derive(Debug, Default)]
struct Armed {
    /// The fault and how many more steps run before it (1: the next step fails).
    fault: Option<(FaultKind, u64)>,
    /// Sleep before every step, to make streams last long enough to observe.
    delay: Duration,
}

/// Shared by the admin route and every executor incarnation.
#[derive(Debug, Default)]
pub struct FaultInjector {
    armed: Mutex<Armed>,
}

impl FaultInjector {
    /// `Some` only when `INFERFLUX_FAULT_INJECTION=1` is set.
    pub fn from_env() -> Option<Arc<Self>> {
        let on = std::env::var(FAULT_INJECTION_ENV).is_ok_and(|v| v == "1");
        if on {
            tracing::warn!(
                "{FAULT_INJECTION_ENV}=1: POST /admin/fault can make the executor fail (tests only)"
            );
        }
        on.then(|| Arc::new(Self::default()))
    }

    /// The executor fails with `kind` on the `after_steps`-th step from now (at least 1).
    pub fn arm(&self, kind: FaultKind, after_steps: u64) {
        if let Ok(mut a) = self.armed.lock() {
            a.fault = Some((kind, after_steps.max(1)));
        }
    }

    /// Every following step first sleeps `delay` (zero turns it off).
    pub fn set_delay(&self, delay: Duration) {
        if let Ok(mut a) = self.armed.lock() {
            a.delay = delay;
        }
    }

    /// Called by the executor at the start of each step: the delay to apply and the fault that
    /// is due now, if any (it is then disarmed).
    pub fn on_step(&self) -> (Duration, Option<FaultKind>) {
        let Ok(mut a) = self.armed.lock() else {
            return (Duration::ZERO, None);
        };
        let due = match &mut a.fault {
            Some((kind, 1)) => Some(*kind),
            Some((_, n)) => {
                *n -= 1;
                None
            }
            None => None,
        };
        if due.is_some() {
            a.fault = None;
        }
        (a.delay, due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supervision_fault_comes_due_on_the_nth_step_once() {
        let f = FaultInjector::default();
        assert_eq!(f.on_step().1, None);
        f.arm(FaultKind::Error, 3);
        assert_eq!(f.on_step().1, None);
        assert_eq!(f.on_step().1, None);
        assert_eq!(f.on_step().1, Some(FaultKind::Error));
        assert_eq!(f.on_step().1, None);
        f.arm(FaultKind::Panic, 0);
        assert_eq!(f.on_step().1, Some(FaultKind::Panic));
        f.set_delay(Duration::from_millis(5));
        assert_eq!(f.on_step(), (Duration::from_millis(5), None));
    }
}
