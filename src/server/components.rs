//! One place that starts the server's components, watches them and stops them.
//!
//! Each component (REST, ADS, CA, webhook, rate-limit service, controller, snapshot builder) is a
//! task that runs until the shared stop signal and then drains. A component that fails, or ends
//! while the server is meant to run, stops the others: the process exits with that error rather
//! than serve with a part missing (an orchestrator restarts it). From the moment the server
//! stops, every component reports "stopping" to `/readyz`, so load balancers take the server out
//! of rotation while it drains.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::ready::Readiness;

/// What stopped the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A component failed.
    #[error("{component}: {source:#}")]
    Failed {
        /// The component.
        component: &'static str,
        /// Its error.
        source: anyhow::Error,
    },
    /// A component ended while the server was meant to run.
    #[error("{0} ended before the server was stopped")]
    Ended(&'static str),
    /// A component's task panicked.
    #[error("{component} panicked: {source}")]
    Panicked {
        /// The component.
        component: &'static str,
        /// The join error.
        source: tokio::task::JoinError,
    },
}

type Outcome = (&'static str, anyhow::Result<()>);

/// The running components and their shared stop signal.
pub struct Components {
    tasks: JoinSet<Outcome>,
    names: std::collections::HashMap<tokio::task::Id, &'static str>,
    stop_tx: watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
    ready: Arc<Readiness>,
}

impl Components {
    /// No component yet; `ready` is what `/readyz` reports.
    pub fn new(ready: Arc<Readiness>) -> Self {
        let (stop_tx, stop_rx) = watch::channel(false);
        Components {
            tasks: JoinSet::new(),
            names: Default::default(),
            stop_tx,
            stop_rx,
            ready,
        }
    }

    /// The signal components stop on: it turns true once.
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop_rx.clone()
    }

    /// Runs `task`, a component that serves until the stop signal and then returns.
    pub fn spawn<F, E>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<anyhow::Error> + Send + 'static,
    {
        let handle = self
            .tasks
            .spawn(async move { (name, task.await.map_err(Into::into)) });
        self.names.insert(handle.id(), name);
    }

    /// Runs `task`, a component that loops forever, until the stop signal.
    pub fn spawn_background<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut stop = self.stop_signal();
        self.spawn(name, async move {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => Ok::<(), anyhow::Error>(()),
                () = task => Err(anyhow::anyhow!("{name} ended")),
            }
        });
    }

    /// Waits for `shutdown` or for a component to end, whichever comes first; then stops every
    /// component and waits up to `drain` for them. The first failure (or unexpected end) is the
    /// result; components still running after `drain` are aborted.
    pub async fn run_until(
        mut self,
        shutdown: impl Future<Output = ()>,
        drain: Duration,
    ) -> Result<(), Error> {
        let mut first: Option<Error> = None;
        tokio::select! {
            () = shutdown => {}
            Some(done) = self.tasks.join_next() => {
                first = failure(&self.names, done, false);
            }
        }
        if let Some(e) = &first {
            tracing::error!(error = %e, "a component stopped: stopping the server");
        }
        for name in self.names.values() {
            self.ready.not_ready(name, "stopping");
        }
        let _ = self.stop_tx.send(true);
        let deadline = tokio::time::Instant::now() + drain;
        loop {
            match tokio::time::timeout_at(deadline, self.tasks.join_next()).await {
                Ok(Some(done)) => {
                    if let Some(e) = failure(&self.names, done, true) {
                        tracing::error!(error = %e, "while stopping");
                        first.get_or_insert(e);
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        left = self.tasks.len(),
                        ?drain,
                        "components still draining at the deadline: aborted"
                    );
                    self.tasks.shutdown().await;
                    break;
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// The error a finished component stands for: none when it returned Ok after the stop signal.
fn failure(
    names: &std::collections::HashMap<tokio::task::Id, &'static str>,
    done: Result<Outcome, tokio::task::JoinError>,
    stopping: bool,
) -> Option<Error> {
    match done {
        Ok((component, Err(source))) => Some(Error::Failed { component, source }),
        Ok((component, Ok(()))) if !stopping => Some(Error::Ended(component)),
        Ok(_) => None,
        Err(source) => Some(Error::Panicked {
            component: names.get(&source.id()).copied().unwrap_or("a component"),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A component that serves until the stop signal, recording that it drained.
    fn server(c: &mut Components, name: &'static str, drained: Arc<AtomicBool>) {
        let mut stop = c.stop_signal();
        c.spawn(name, async move {
            let _ = stop.wait_for(|s| *s).await;
            drained.store(true, Ordering::SeqCst);
            Ok::<(), std::io::Error>(())
        });
    }

    #[tokio::test]
    async fn shutdown_stops_and_drains_every_component() {
        let ready = Arc::new(Readiness::default());
        let mut c = Components::new(ready.clone());
        let (a, b) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        server(&mut c, "rest", a.clone());
        server(&mut c, "xds", b.clone());
        c.spawn_background("builder", std::future::pending());
        c.run_until(async {}, Duration::from_secs(5)).await.unwrap();
        assert!(a.load(Ordering::SeqCst) && b.load(Ordering::SeqCst));
        let (ok, states) = ready.report();
        assert!(!ok);
        assert_eq!(states["rest"].as_deref(), Some("stopping"));
    }

    #[tokio::test]
    async fn a_failing_component_stops_the_others_and_is_the_result() {
        let mut c = Components::new(Arc::new(Readiness::default()));
        let drained = Arc::new(AtomicBool::new(false));
        server(&mut c, "rest", drained.clone());
        c.spawn("webhook", async {
            Err::<(), _>(std::io::Error::other("bind lost"))
        });
        let e = c
            .run_until(std::future::pending(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::Failed {
                    component: "webhook",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("bind lost"), "{e}");
        assert!(drained.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_component_that_ends_early_is_a_failure() {
        let mut c = Components::new(Arc::new(Readiness::default()));
        c.spawn_background("builder", async {});
        let e = c
            .run_until(std::future::pending(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("builder"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn components_past_the_drain_deadline_are_aborted() {
        let mut c = Components::new(Arc::new(Readiness::default()));
        c.spawn("stuck", async {
            std::future::pending::<()>().await;
            Ok::<(), std::io::Error>(())
        });
        let r = c.run_until(async {}, Duration::from_secs(1)).await;
        assert!(r.is_ok(), "an abort at the deadline is not an error: {r:?}");
    }
}
