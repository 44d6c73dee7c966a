//! Metric names and the periodic gauge refresh (via the `metrics` facade;
//! whoever embeds the broker installs the exporter).

use std::sync::Arc;
use std::time::Duration;

use crate::config::Topology;
use crate::engine::Engine;

/// Events accepted on a topic (counter, label `topic`).
pub const PUBLISHED: &str = "flotilla_broker_published_total";
/// Messages stored and not in flight (gauge, label `queue`).
pub const QUEUE_DEPTH: &str = "flotilla_broker_queue_depth";
/// Messages delivered and not yet acknowledged (gauge, label `queue`).
pub const QUEUE_IN_FLIGHT: &str = "flotilla_broker_queue_in_flight";
/// Messages waiting out a delivery delay (gauge, label `queue`).
pub const QUEUE_DELAYED: &str = "flotilla_broker_queue_delayed";
/// Messages a queue moved to its dead-letter queue (counter, label `queue`).
pub const QUEUE_DEAD_LETTERED: &str = "flotilla_broker_queue_dead_lettered_total";
/// Records retained per partition (gauge, labels `stream`, `partition`).
pub const STREAM_DEPTH: &str = "flotilla_broker_stream_depth";
/// Push delivery attempts (counter, labels `subscription`, `outcome`:
/// `ok`, `retry`, `dead_letter`, `dropped`).
pub const PUSH_DELIVERIES: &str = "flotilla_broker_push_deliveries_total";

/// Refreshes the depth gauges from engine stats every `every` until the
/// returned task is aborted.
pub(crate) fn spawn_refresh(
    engine: Arc<dyn Engine>,
    topology: Topology,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for name in topology.queues.keys() {
                if let Ok(s) = engine.queue_stats(name).await {
                    let q = name.clone();
                    metrics::gauge!(QUEUE_DEPTH, "queue" => q.clone()).set(s.ready as f64);
                    metrics::gauge!(QUEUE_IN_FLIGHT, "queue" => q.clone()).set(s.in_flight as f64);
                    metrics::gauge!(QUEUE_DELAYED, "queue" => q.clone()).set(s.delayed as f64);
                    metrics::counter!(QUEUE_DEAD_LETTERED, "queue" => q).absolute(s.dead_lettered);
                }
            }
            for name in topology.streams.keys() {
                if let Ok(parts) = engine.stream_stats(name).await {
                    for p in parts {
                        metrics::gauge!(STREAM_DEPTH, "stream" => name.clone(), "partition" => p.partition.to_string())
                            .set(p.records as f64);
                    }
                }
            }
        }
    })
}
