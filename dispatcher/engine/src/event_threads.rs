//! Where the event path runs: on the process's shared runtime, or on
//! threads of its own (`runtime.event_threads`), each a single-threaded
//! runtime that runs a share of the conversations' workers.
//!
//! On the shared (work-stealing) runtime a task woken while another worker
//! thread sleeps wakes that thread, and tasks move between threads' caches;
//! on a small machine this hand-off traffic costs about a fifth of the CPU
//! of an event (BENCHMARKS.md, "Event threads"). An event thread keeps the
//! consume loop, the settler and its workers' tasks on one thread: they
//! hand work to each other without waking anyone. What is not the event
//! path (the API, the bus's connection, timers, sweeps) stays on the
//! shared runtime.
//!
//! A task's place is fixed: a worker stays on its thread, and a script
//! step or `when` with a large operation limit runs inline there (there is
//! no other worker thread to move the thread's other tasks to), holding up
//! that thread's conversations until it ends or reaches its deadline.

use std::future::Future;
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Spawns the event path's tasks in their places: a cheap handle. The
/// default puts every task on the shared runtime (the caller's).
#[derive(Debug, Clone, Default)]
pub struct Spawner {
    /// The event threads' runtimes; none: the shared runtime.
    threads: Arc<[Handle]>,
}

impl Spawner {
    /// How many event threads there are (0: the shared runtime).
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Spawns the `n`th task of a set spread over the event threads (round
    /// robin; any `n` on the shared runtime).
    pub fn spawn<F>(&self, n: usize, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self.threads.get(n % self.threads.len().max(1)) {
            Some(thread) => thread.spawn(task),
            None => tokio::spawn(task),
        }
    }
}

/// The event threads, running until stopped or dropped.
#[derive(Debug)]
pub struct EventThreads {
    spawner: Spawner,
    stops: Vec<oneshot::Sender<()>>,
    joins: Vec<std::thread::JoinHandle<()>>,
}

impl EventThreads {
    /// Starts `n` event threads (`switchboard-events-{i}`); none for 0.
    pub fn start(n: usize) -> std::io::Result<Self> {
        let mut handles = Vec::with_capacity(n);
        let mut stops = Vec::with_capacity(n);
        let mut joins = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            stops.push(stop);
            joins.push(
                std::thread::Builder::new()
                    .name(format!("switchboard-events-{i}"))
                    .spawn(move || {
                        // Drives the tasks spawned onto it until stopped;
                        // dropping the runtime then cancels what is left.
                        let _ = runtime.block_on(stopped);
                    })?,
            );
        }
        Ok(Self {
            spawner: Spawner {
                threads: handles.into(),
            },
            stops,
            joins,
        })
    }

    /// Spawns tasks on these threads.
    pub fn spawner(&self) -> Spawner {
        self.spawner.clone()
    }

    /// Stops the threads and waits for them, once the event path is done
    /// (a task still on them is cancelled).
    pub async fn stop(mut self) {
        let joins = self.end();
        let _ = tokio::task::spawn_blocking(move || {
            for join in joins {
                let _ = join.join();
            }
        })
        .await;
    }

    fn end(&mut self) -> Vec<std::thread::JoinHandle<()>> {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        std::mem::take(&mut self.joins)
    }
}

impl Drop for EventThreads {
    fn drop(&mut self) {
        // Not joined here: a drop may run on a runtime thread.
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tasks spawned on event threads run there, round robin, each on a
    /// thread of its own name; on the shared runtime they run on the
    /// caller's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tasks_run_on_the_event_threads_round_robin() {
        let threads = EventThreads::start(2).unwrap();
        let spawner = threads.spawner();
        assert_eq!(spawner.threads(), 2);
        let mut names = Vec::new();
        for n in 0..4 {
            let name = spawner
                .spawn(n, async {
                    // A timer works there too.
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    std::thread::current().name().map(str::to_string)
                })
                .await
                .unwrap();
            names.push(name.unwrap_or_default());
        }
        assert_eq!(
            names,
            [
                "switchboard-events-0",
                "switchboard-events-1",
                "switchboard-events-0",
                "switchboard-events-1"
            ]
        );
        threads.stop().await;

        let shared = Spawner::default();
        assert_eq!(shared.threads(), 0);
        let flavor = shared
            .spawn(5, async {
                tokio::runtime::Handle::current().runtime_flavor()
            })
            .await
            .unwrap();
        assert_eq!(flavor, tokio::runtime::RuntimeFlavor::MultiThread);
    }
}
