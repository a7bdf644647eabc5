//! Closed-loop load: each worker owns a session and sends its next `tools/call` as soon as the
//! previous one is answered, so concurrency = calls in flight. A phase runs until a deadline or
//! until a shared call budget is spent; latency is measured per call from send to the complete,
//! checked reply.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::mcp::{Session, ToolCall};

/// When a phase ends.
#[derive(Clone)]
pub enum Stop {
    /// Calls started before this instant run; the phase ends when they are answered.
    At(Instant),
    /// This many calls in total, shared by the workers.
    Budget(Arc<AtomicU64>),
    /// Until the instant and at least `min` calls (counted in `started`): a CPU-per-call figure
    /// read from 10 ms clock ticks needs enough calls whatever the throughput.
    AtLeast {
        deadline: Instant,
        min: u64,
        started: Arc<AtomicU64>,
    },
}

impl Stop {
    pub fn after(d: Duration) -> Self {
        Self::At(Instant::now() + d)
    }

    pub fn calls(n: u64) -> Self {
        Self::Budget(Arc::new(AtomicU64::new(n)))
    }

    pub fn after_at_least(d: Duration, min: u64) -> Self {
        Self::AtLeast {
            deadline: Instant::now() + d,
            min,
            started: Arc::default(),
        }
    }

    /// Whether a worker may start another call (taking it from the budget).
    fn take(&self) -> bool {
        match self {
            Self::At(deadline) => Instant::now() < *deadline,
            Self::Budget(left) => left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok(),
            Self::AtLeast {
                deadline,
                min,
                started,
            } => started.fetch_add(1, Ordering::Relaxed) < *min || Instant::now() < *deadline,
        }
    }
}

/// What one phase produced.
pub struct Sample {
    /// Successful calls' latencies, sorted.
    pub latencies: Vec<Duration>,
    pub errors: u64,
    pub first_error: Option<String>,
    /// From the first call sent to the last reply.
    pub elapsed: Duration,
}

/// The figures reported for a sample.
#[derive(Clone, Serialize)]
pub struct Stats {
    pub calls: u64,
    pub errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    pub seconds: f64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Sample {
    pub fn stats(&self) -> Stats {
        let calls = self.latencies.len() as u64;
        let seconds = self.elapsed.as_secs_f64();
        Stats {
            calls,
            errors: self.errors,
            first_error: self.first_error.clone(),
            seconds,
            rps: if seconds > 0.0 {
                calls as f64 / seconds
            } else {
                0.0
            },
            p50_ms: percentile_ms(&self.latencies, 0.50),
            p90_ms: percentile_ms(&self.latencies, 0.90),
            p99_ms: percentile_ms(&self.latencies, 0.99),
            max_ms: self.latencies.last().map_or(0.0, ms),
        }
    }
}

/// Nearest-rank percentile of sorted durations, in milliseconds (0 when empty).
pub fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    ms(&sorted[rank.clamp(1, sorted.len()) - 1])
}

pub fn ms(d: &Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Run one phase with every session as a worker; the sessions come back for the next phase.
pub async fn phase(sessions: Vec<Session>, call: &ToolCall, stop: Stop) -> (Vec<Session>, Sample) {
    let call = Arc::new(call.clone());
    let started = Instant::now();
    let workers: Vec<_> = sessions
        .into_iter()
        .map(|session| tokio::spawn(work(session, call.clone(), stop.clone())))
        .collect();
    let mut sessions = Vec::with_capacity(workers.len());
    let mut sample = Sample {
        latencies: Vec::new(),
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
    };
    for worker in workers {
        let (session, done) = worker.await.expect("a load worker panicked");
        sessions.push(session);
        sample.latencies.extend(done.latencies);
        sample.errors += done.errors;
        if sample.first_error.is_none() {
            sample.first_error = done.first_error;
        }
    }
    sample.elapsed = started.elapsed();
    sample.latencies.sort_unstable();
    (sessions, sample)
}

struct WorkerResult {
    latencies: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

async fn work(mut session: Session, call: Arc<ToolCall>, stop: Stop) -> (Session, WorkerResult) {
    let mut done = WorkerResult {
        latencies: Vec::with_capacity(4096),
        errors: 0,
        first_error: None,
    };
    while stop.take() {
        let sent = Instant::now();
        match session.call_tool(&call).await {
            Ok(()) => done.latencies.push(sent.elapsed()),
            Err(e) => {
                done.errors += 1;
                done.first_error.get_or_insert(e);
                // A broken target fails fast; do not spin.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    (session, done)
}
