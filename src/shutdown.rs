//! Graceful shutdown as one small type passed to every task: a task finishes
//! the unit of work in hand, then returns when the signal fires.

use tokio::sync::watch;

/// Fires shutdown for every [`Shutdown`] cloned from it.
#[derive(Clone)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// A task's view of the shutdown signal.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A new trigger and the listener to hand to tasks.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    /// Asks every task to stop.
    pub fn trigger(&self) {
        let _ = self.0.send(true);
    }

    /// A listener for another task.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    /// Whether shutdown has been asked for.
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves when shutdown is asked for (at once if it already was).
    pub async fn triggered(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn os_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
