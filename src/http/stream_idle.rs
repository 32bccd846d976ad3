//! Idle-stream timeout (`server.stream_idle_timeout_seconds`) for SSE answers.
//!
//! actix polls a response body only while it can write: when a client stops reading, the socket
//! buffers fill, the connection stops taking bytes, and the body is no longer polled. What is
//! visible from the body's side is therefore "an event is ready (the stream yielded it, or was
//! woken by it) but actix has not come back for it". [`IdleWatch`] records since when that has
//! been so; a watchdog task cancels the request's sequences (freeing their KV pages) once it
//! lasts the timeout. A stream that is merely waiting for tokens (queued, or a slow step) is not
//! idle: nothing is ready. The connection itself stays until the client reads (it then gets an
//! error event) or goes away; only kernel buffers are held meanwhile.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures::task::ArcWake;
use futures::Stream;

/// What the stream and its watchdog share.
#[derive(Default)]
struct Shared {
    /// Since when an event has been ready that actix has not polled for; `None` while polled.
    ready_since: Mutex<Option<Instant>>,
    /// The waker of actix's task, to pass wake-ups on.
    outer: Mutex<Option<Waker>>,
}

impl ArcWake for Shared {
    fn wake_by_ref(arc: &Arc<Self>) {
        lock(&arc.ready_since).get_or_insert_with(Instant::now);
        if let Some(w) = lock(&arc.outer).as_ref() {
            w.wake_by_ref();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// How long an event has waited for the consumer at `now`.
    fn unread_for(&self, now: Instant) -> Duration {
        lock(&self.ready_since).map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }
}

/// A stream that records when its consumer stops coming back for ready items.
pub struct IdleWatch<S> {
    inner: Pin<Box<S>>,
    shared: Arc<Shared>,
}

impl<S: Stream> Stream for IdleWatch<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        *lock(&self.shared.outer) = Some(cx.waker().clone());
        *lock(&self.shared.ready_since) = None;
        let waker = futures::task::waker(self.shared.clone());
        let polled = self.inner.as_mut().poll_next(&mut Context::from_waker(&waker));
        if let Poll::Ready(Some(_)) = &polled {
            // Handed on: actix comes straight back for the next one unless it cannot write.
            *lock(&self.shared.ready_since) = Some(Instant::now());
        }
        polled
    }
}

/// Wraps `stream`; when its consumer leaves a ready item unread for `timeout`, `on_idle` runs
/// once (on the current actix runtime). A zero `timeout` never fires.
pub fn watch<S: Stream + 'static>(
    stream: S,
    timeout: Duration,
    on_idle: impl FnOnce(Duration) + 'static,
) -> IdleWatch<S> {
    let shared = Arc::new(Shared::default());
    if !timeout.is_zero() {
        let weak = Arc::downgrade(&shared);
        let every = (timeout / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
        actix_web::rt::spawn(watchdog(weak, timeout, every, on_idle));
    }
    IdleWatch {
        inner: Box::pin(stream),
        shared,
    }
}

async fn watchdog(weak: Weak<Shared>, timeout: Duration, every: Duration, on_idle: impl FnOnce(Duration)) {
    loop {
        tokio::time::sleep(every).await;
        // Gone with the stream: the response ended or the client disconnected.
        let Some(shared) = weak.upgrade() else { return };
        let unread = shared.unread_for(Instant::now());
        if unread >= timeout {
            on_idle(unread);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::cell::Cell;
    use std::rc::Rc;

    #[actix_web::test]
    async fn limits_idle_watch_fires_only_for_an_unread_ready_item() {
        // A consumer that keeps polling never trips it, even while the source waits.
        let fired = Rc::new(Cell::new(false));
        let f = fired.clone();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
        let stream = tokio_stream_from(rx);
        let mut watched = watch(stream, Duration::from_millis(100), move |_| f.set(true));
        actix_web::rt::spawn(async move {
            for i in 0..3 {
                tokio::time::sleep(Duration::from_millis(150)).await;
                tx.send(i).unwrap();
            }
        });
        for i in 0..3 {
            assert_eq!(watched.next().await, Some(i));
        }
        assert!(!fired.get(), "waiting for the source is not idle");
        drop(watched);

        // A consumer that takes one item and stops coming back trips it.
        let fired = Rc::new(Cell::new(None));
        let f = fired.clone();
        let mut watched = watch(
            futures::stream::iter(0..10),
            Duration::from_millis(100),
            move |d| f.set(Some(d)),
        );
        assert_eq!(watched.next().await, Some(0));
        let started = Instant::now();
        while fired.get().is_none() {
            assert!(started.elapsed() < Duration::from_secs(5), "never fired");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(fired.get().unwrap() >= Duration::from_millis(100));
        drop(watched);
    }

    fn tokio_stream_from(mut rx: tokio::sync::mpsc::UnboundedReceiver<u32>) -> impl Stream<Item = u32> {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
