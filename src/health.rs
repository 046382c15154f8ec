//! What `/livez` and `/readyz` answer from: the roles' tasks (running, or
//! ended and why) and each consumer's state, as the tasks report them.
//!
//! Liveness is the process itself: a task that ends makes the process exit
//! (see [`crate::runtime`]), so a live process is one whose tasks all run.
//! Readiness adds what the process depends on: each consumer subscribed and
//! either assigned partitions or waiting for an assignment, and the database
//! reachable (checked by the HTTP handler).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// A consumer's state, as its driver last reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ConsumerState {
    /// Created; has not asked the broker for anything yet.
    Starting,
    /// Subscribed, no partitions assigned (yet, or more members than partitions).
    WaitingForAssignment,
    /// Reading `partitions` partitions.
    Assigned { partitions: usize },
    /// Holding its partitions because something it depends on is down.
    Held { reason: String },
}

impl ConsumerState {
    fn ready(&self) -> bool {
        !matches!(self, ConsumerState::Starting)
    }
}

/// A task's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum TaskState {
    Running,
    Ended { reason: String },
}

/// The readiness report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub tasks: BTreeMap<String, TaskState>,
    pub consumers: BTreeMap<String, ConsumerState>,
}

#[derive(Default)]
struct Inner {
    tasks: BTreeMap<String, TaskState>,
    consumers: BTreeMap<String, ConsumerState>,
}

/// Shared health state; cheap to clone. The default knows no task and no
/// consumer (ready as far as it is concerned).
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<Mutex<Inner>>,
}

impl Health {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().expect("health lock poisoned"))
    }

    /// Records that task `name` runs.
    pub fn task_running(&self, name: &str) {
        self.with(|i| i.tasks.insert(name.to_owned(), TaskState::Running));
    }

    /// Records that task `name` ended, and why.
    pub fn task_ended(&self, name: &str, reason: &str) {
        self.with(|i| {
            i.tasks.insert(
                name.to_owned(),
                TaskState::Ended {
                    reason: reason.to_owned(),
                },
            )
        });
    }

    /// Records consumer `name`'s state.
    pub fn consumer(&self, name: &str, state: ConsumerState) {
        self.with(|i| i.consumers.insert(name.to_owned(), state));
    }

    /// Whether every task runs and every consumer is subscribed (the
    /// database is checked by the caller).
    pub fn readiness(&self) -> Readiness {
        self.with(|i| Readiness {
            ready: i.tasks.values().all(|t| *t == TaskState::Running)
                && i.consumers.values().all(ConsumerState::ready),
            tasks: i.tasks.clone(),
            consumers: i.consumers.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_every_task_runs_and_every_consumer_is_subscribed() {
        let health = Health::default();
        assert!(health.readiness().ready, "nothing registered");
        health.task_running("ingest");
        health.consumer("ingest", ConsumerState::Starting);
        assert!(!health.readiness().ready, "consumer not subscribed yet");
        health.consumer("ingest", ConsumerState::WaitingForAssignment);
        assert!(health.readiness().ready);
        health.consumer(
            "ingest",
            ConsumerState::Held {
                reason: "registry down".into(),
            },
        );
        assert!(
            health.readiness().ready,
            "an outage elsewhere is not this pod's fault"
        );
        health.task_ended("ingest", "panicked");
        assert!(!health.readiness().ready);
    }
}
