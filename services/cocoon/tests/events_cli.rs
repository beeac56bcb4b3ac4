//! `cocoon events dump|tail` against a real nats-server: filters, undecodable frames, following new frames.

use std::time::Duration;

use bus::{Bus, Publisher, PublisherConfig, provision_streams};
use cocoon::Shutdown;
use cocoon::cli::Filter;
use cocoon::dump::{Query, dump};
use events::sample::all_records;
use serde_json::Value;
use tests::NatsServer;

async fn stack() -> (NatsServer, Bus) {
    let server = NatsServer::start().await;
    let bus = Bus::from_client(server.client().await, Duration::from_secs(5));
    provision_streams(&bus.jetstream, 1).await.unwrap();
    (server, bus)
}

async fn publish_samples(bus: &Bus) -> usize {
    let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default()).unwrap();
    // Fresh event ids: a frame's Nats-Msg-Id comes from its event ids, and a repeat would be deduplicated.
    let mut records = all_records();
    for r in &mut records {
        r.envelope.event_id = events::EventId::new();
    }
    for r in &records {
        drop(publisher.publish(r).await.unwrap());
    }
    publisher.flush().await.unwrap();
    records.len()
}

async fn run(bus: &Bus, filter: Filter) -> Vec<Value> {
    let query = Query::from_filter(&filter, false).unwrap();
    let mut out = Vec::new();
    dump(&bus.jetstream, &query, &mut out, Shutdown::new())
        .await
        .unwrap();
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn types(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["type"].as_str().unwrap_or("<error>").to_owned())
        .collect()
}

#[tokio::test]
async fn dump_prints_every_event_as_a_json_line() {
    let (_server, bus) = stack().await;
    let published = publish_samples(&bus).await;
    let lines = run(&bus, Filter::default()).await;
    assert_eq!(lines.len(), published);
    let mut kinds = types(&lines);
    kinds.sort();
    let mut expected: Vec<String> = events::EVENT_KINDS
        .iter()
        .map(|k| k.name.to_owned())
        .collect();
    expected.sort();
    assert_eq!(kinds, expected);
    let first = &lines[0];
    assert_eq!(first["stream"], "TASKS");
    assert!(first["seq"].as_u64().unwrap() >= 1);
    assert!(first["subject"].as_str().unwrap().starts_with("tasks."));
    assert!(first["stored_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(first["envelope"]["schema_version"], 1);
}

#[tokio::test]
async fn dump_filters_by_stream_subject_type_sequence_time_and_limit() {
    let (_server, bus) = stack().await;
    publish_samples(&bus).await;
    publish_samples(&bus).await; // a second copy of every frame, at later sequences

    let payments = run(
        &bus,
        Filter {
            streams: vec!["payments".into()],
            ..Default::default()
        },
    )
    .await;
    let per_copy = all_records()
        .iter()
        .filter(|r| r.event.stream() == events::Stream::Payments)
        .count();
    assert_eq!(payments.len(), 2 * per_copy);
    assert!(payments.iter().all(|l| l["stream"] == "PAYMENTS"));

    let results = run(
        &bus,
        Filter {
            subjects: vec!["results.*.>".into()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(types(&results), vec!["TaskResult", "TaskResult"]);
    let none = run(
        &bus,
        Filter {
            subjects: vec!["results.nobody".into()],
            ..Default::default()
        },
    )
    .await;
    assert!(none.is_empty());

    let started = run(
        &bus,
        Filter {
            types: vec!["TaskStarted".into()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(types(&started), vec!["TaskStarted", "TaskStarted"]);

    // A sequence range of one frame gives exactly that frame's events (one frame per subject and publish).
    let stored = bus::read_events(&bus.jetstream, events::Stream::Tasks, vec![])
        .await
        .unwrap();
    let in_second = stored.iter().filter(|(seq, _)| *seq == 2).count();
    assert!(in_second > 0);
    let second = run(
        &bus,
        Filter {
            streams: vec!["tasks".into()],
            from_seq: Some(2),
            to_seq: Some(2),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(second.len(), in_second);
    assert!(second.iter().all(|l| l["seq"] == 2));

    let limited = run(
        &bus,
        Filter {
            limit: Some(3),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(limited.len(), 3);

    let future = run(
        &bus,
        Filter {
            since: Some("2100-01-01T00:00:00Z".into()),
            ..Default::default()
        },
    )
    .await;
    assert!(future.is_empty());
    let past = run(
        &bus,
        Filter {
            until: Some("2000-01-01T00:00:00Z".into()),
            ..Default::default()
        },
    )
    .await;
    assert!(past.is_empty());
    let recent = run(
        &bus,
        Filter {
            since: Some("1h".into()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(recent.len(), 2 * events::EVENT_KINDS.len());
}

#[tokio::test]
async fn undecodable_frames_are_shown_with_their_reason() {
    let (_server, bus) = stack().await;
    bus.jetstream
        .publish("tasks.1.operator", "not a frame".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let lines = run(
        &bus,
        Filter {
            streams: vec!["tasks".into()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["error"]["kind"], "missing_header");
    assert_eq!(lines[0]["seq"], 1);
}

#[tokio::test]
async fn bad_filters_are_refused_with_what_was_wrong() {
    let err = |f: Filter| Query::from_filter(&f, false).unwrap_err().to_string();
    assert!(
        err(Filter {
            streams: vec!["nope".into()],
            ..Default::default()
        })
        .contains("unknown stream")
    );
    assert!(
        err(Filter {
            types: vec!["TaskExploded".into()],
            ..Default::default()
        })
        .contains("unknown event type")
    );
    assert!(
        err(Filter {
            since: Some("yesterday".into()),
            ..Default::default()
        })
        .contains("RFC 3339")
    );
    assert!(
        err(Filter {
            from_seq: Some(5),
            to_seq: Some(2),
            ..Default::default()
        })
        .contains("after")
    );
    assert!(
        err(Filter {
            subjects: vec!["bogus.1".into()],
            ..Default::default()
        })
        .contains("no stream")
    );
}

#[tokio::test]
async fn tail_prints_frames_published_after_it_started() {
    let (_server, bus) = stack().await;
    publish_samples(&bus).await; // history that tail must not print
    let query = Query::from_filter(
        &Filter {
            streams: vec!["workers".into()],
            limit: Some(3),
            ..Default::default()
        },
        true,
    )
    .unwrap();
    let js = bus.jetstream.clone();
    let tail = tokio::spawn(async move {
        let mut out = Vec::new();
        dump(&js, &query, &mut out, Shutdown::new()).await.unwrap();
        out
    });
    // Keep publishing heartbeats until the tail has seen three of them (it may start after the first).
    let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default()).unwrap();
    let heartbeat = all_records()
        .into_iter()
        .find(|r| r.event.kind() == "WorkerHeartbeat")
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut tail = tail;
    let out = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "tail printed nothing new"
        );
        let mut r = heartbeat.clone();
        r.envelope.event_id = events::EventId::new();
        drop(publisher.publish(&r).await.unwrap());
        publisher.flush().await.unwrap();
        if let Ok(done) = tokio::time::timeout(Duration::from_millis(100), &mut tail).await {
            break String::from_utf8(done.unwrap()).unwrap();
        }
    };
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(types(&lines), vec!["WorkerHeartbeat"; 3]);
    // The historic frame (sequence 1) was not printed.
    assert!(lines.iter().all(|l| l["seq"].as_u64().unwrap() > 1));
}

#[tokio::test]
async fn tail_stops_on_shutdown() {
    let (_server, bus) = stack().await;
    let query = Query::from_filter(&Filter::default(), true).unwrap();
    let shutdown = Shutdown::new();
    let stop = shutdown.clone();
    let js = bus.jetstream.clone();
    let tail = tokio::spawn(async move {
        let mut out = Vec::new();
        dump(&js, &query, &mut out, stop).await.unwrap()
    });
    shutdown.trigger();
    let summary = tokio::time::timeout(Duration::from_secs(10), tail)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(summary.events, 0);
}

#[test]
fn the_binary_dumps_and_reports_bad_input() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (server, bus) = rt.block_on(stack());
    rt.block_on(publish_samples(&bus));
    let bin = env!("CARGO_BIN_EXE_cocoon");
    let out = std::process::Command::new(bin)
        .args([
            "--nats-url",
            &server.url(),
            "events",
            "dump",
            "--stream",
            "results",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1);
    assert!(stdout.contains("\"type\":\"TaskResult\""));
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 events from 1 frames"));

    let bad = std::process::Command::new(bin)
        .args([
            "--nats-url",
            &server.url(),
            "events",
            "dump",
            "--stream",
            "nope",
        ])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown stream \"nope\""));

    let down = std::process::Command::new(bin)
        .args(["--nats-url", "nats://127.0.0.1:1", "events", "dump"])
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("is the stack running?"));
}
