//! The closed loop every throughput benchmark runs: each client sends its next request as soon
//! as the previous one is answered, until the phase ends.

use std::time::{Duration, Instant};

use cellplane_tests::measure::Samples;

/// One client's request loop.
#[tonic::async_trait]
pub trait Client: Send + 'static {
    async fn call(&mut self) -> anyhow::Result<()>;
}

/// Throughput and latency of one phase.
pub struct Measured {
    pub rate: f64,
    pub p50: Duration,
    pub p99: Duration,
}

pub async fn drive(clients: Vec<Box<dyn Client>>, phase: Duration) -> anyhow::Result<Measured> {
    let started = Instant::now();
    let deadline = started + phase;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let mut samples = Samples::default();
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    client.call().await?;
                    samples.record(sent.elapsed());
                }
                anyhow::Ok(samples)
            })
        })
        .collect();
    let mut samples = Samples::default();
    for task in tasks {
        samples.merge(task.await??);
    }
    Ok(Measured {
        rate: samples.len() as f64 / started.elapsed().as_secs_f64(),
        p50: samples.percentile(50.0),
        p99: samples.percentile(99.0),
    })
}
