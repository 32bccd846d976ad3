//! A spinner on stderr while a request waits for its first token, only when stderr is a terminal,
//! so that pipes and logs never see it.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];

/// Spins on its own thread; [`Spinner::stop`] (or dropping it) clears the line and returns only
/// once the thread can draw no more, so that the first text is never overdrawn.
pub struct Spinner {
    running: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl Spinner {
    pub fn start() -> Self {
        if !std::io::stderr().is_terminal() {
            return Self { running: None };
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            for frame in FRAMES.iter().cycle() {
                if flag.load(Ordering::Acquire) {
                    break;
                }
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r{frame} ");
                let _ = err.flush();
                drop(err);
                std::thread::park_timeout(Duration::from_millis(80));
            }
        });
        Self {
            running: Some((stop, thread)),
        }
    }

    /// Clears the spinner; a no-op once stopped or when it never ran.
    pub fn stop(&mut self) {
        if let Some((stop, thread)) = self.running.take() {
            stop.store(true, Ordering::Release);
            thread.thread().unpark();
            let _ = thread.join();
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r  \r");
            let _ = err.flush();
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.stop();
    }
}
