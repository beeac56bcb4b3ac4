//! The projector's Prometheus metrics, per projection and stream, after a real run.

use std::time::Duration;

use bus::{Bus, Publisher, PublisherConfig, provision_streams};
use projector::ProjectorConfig;
use tests::{NatsServer, TestDb};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn metrics_report_events_batches_lag_and_dead_letters() {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    let server = NatsServer::start().await;
    let db = TestDb::create().await;
    let bus = Bus::from_client(server.client().await, Duration::from_secs(5));
    provision_streams(&bus.jetstream, 1).await.unwrap();
    bus.jetstream
        .publish("tasks.3.operator", "garbage".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default()).unwrap();
    let records = events::sample::lifecycle(20, 2);
    let on_tasks = records
        .iter()
        .filter(|r| r.event.stream() == events::Stream::Tasks)
        .count();
    for r in &records {
        drop(publisher.publish(r).await.unwrap());
    }
    publisher.flush().await.unwrap();

    let mut config = ProjectorConfig::new(server.url(), db.url());
    config.fetch_wait = Duration::from_millis(300);
    projector::run(config, CancellationToken::new(), true)
        .await
        .unwrap();

    let text = handle.render();
    let value = |name: &str, projection: &str, stream: &str| -> f64 {
        let prefix = format!("{name}{{projection=\"{projection}\",stream=\"{stream}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
            .parse()
            .unwrap()
    };
    assert_eq!(
        value(projector::metrics::EVENTS_APPLIED, "tasks", "TASKS"),
        on_tasks as f64
    );
    assert_eq!(
        value(projector::metrics::FRAMES_DEAD_LETTERED, "tasks", "TASKS"),
        1.0
    );
    assert_eq!(value(projector::metrics::LAG_FRAMES, "tasks", "TASKS"), 0.0);
    assert_eq!(
        value(projector::metrics::LAG_SECONDS, "payments", "PAYMENTS"),
        0.0
    );
    assert!(value(projector::metrics::EVENTS_APPLIED, "payments", "PAYMENTS") > 0.0);
    assert!(
        text.contains(&format!(
            "{}_count{{projection=\"workers\",stream=\"WORKERS\"}}",
            projector::metrics::BATCH_SECONDS
        )) || text.contains(&format!(
            "{}{{projection=\"workers\",stream=\"WORKERS\",quantile",
            projector::metrics::BATCH_SECONDS
        ))
    );
    assert!(text.contains(projector::metrics::BATCH_EVENTS));
}
