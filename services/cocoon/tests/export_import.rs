//! `cocoon events export|import` against real nats-servers: a round trip reproduces the frames, filters
//! limit the export, re-imports are duplicates, non-empty targets are refused, damaged files are typed errors.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bus::{Bus, Publisher, PublisherConfig, provision_streams};
use cocoon::Shutdown;
use cocoon::cli::{ExportArgs, Filter};
use cocoon::export::{
    ImportError, ImportOptions, ImportSummary, export, export_query, import, verify,
};
use events::Stream;
use events::sample::all_records;
use tests::{NatsServer, TempDir};

async fn stack() -> (NatsServer, Bus) {
    let server = NatsServer::start().await;
    let bus = Bus::from_client(server.client().await, Duration::from_secs(5));
    provision_streams(&bus.jetstream, 1).await.unwrap();
    (server, bus)
}

/// Publishes one of every sample event, with fresh ids (a frame's Nats-Msg-Id comes from its event ids).
async fn publish_samples(bus: &Bus) -> usize {
    let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default()).unwrap();
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

/// A stored message as the test compares it: subject, headers as sorted pairs, body.
#[derive(Debug, PartialEq, Eq)]
struct Stored {
    subject: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// Every message of a stream, in order.
async fn stored(bus: &Bus, stream: Stream) -> Vec<Stored> {
    let handle = bus.jetstream.get_stream(stream.name()).await.unwrap();
    let state = handle.get_info().await.unwrap().state;
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        let message = handle.get_raw_message(seq).await.unwrap();
        let mut headers: Vec<(String, String)> = message
            .headers
            .iter()
            .flat_map(|(name, values)| {
                values
                    .iter()
                    .map(move |v| (name.to_string(), v.as_str().to_owned()))
            })
            .collect();
        headers.sort();
        out.push(Stored {
            subject: message.subject.to_string(),
            headers,
            body: message.payload.to_vec(),
        });
    }
    out
}

async fn export_to(bus: &Bus, filter: Filter, path: &Path) -> cocoon::export::ExportSummary {
    let args = ExportArgs {
        output: path.to_path_buf(),
        filter,
    };
    let query = export_query(&args).unwrap();
    let (bytes, summary) = export(&bus.jetstream, &query, Vec::new(), Shutdown::new())
        .await
        .unwrap();
    std::fs::write(path, bytes).unwrap();
    summary
}

async fn import_from(
    bus: &Bus,
    path: &Path,
    allow_non_empty: bool,
) -> anyhow::Result<ImportSummary> {
    let options = ImportOptions {
        allow_non_empty,
        ..ImportOptions::default()
    };
    import(&bus.jetstream, path, &options, Shutdown::new()).await
}

fn file(dir: &TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

#[tokio::test]
async fn export_then_import_into_a_fresh_server_reproduces_every_frame() {
    let (_source_server, source) = stack().await;
    let events = publish_samples(&source).await + publish_samples(&source).await;
    // An undecodable message travels too: export moves frames, not events.
    source
        .jetstream
        .publish("tasks.1.operator", "not a frame".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let dir = TempDir::new("cocoon-export");
    let path = file(&dir, "log.cocoon");
    let exported = export_to(&source, Filter::default(), &path).await;
    assert_eq!(exported.trailer.events, events as u64);
    assert_eq!(exported.trailer.stream("TASKS").unwrap().opaque_frames, 1);
    assert_eq!(exported.header.streams.len(), Stream::EVENT_STREAMS.len());

    let (_target_server, target) = stack().await;
    let imported = import_from(&target, &path, false).await.unwrap();
    assert_eq!(imported.frames, exported.trailer.frames);
    assert_eq!(imported.stored, exported.trailer.frames);
    assert_eq!((imported.duplicates, imported.failed), (0, 0));
    assert_eq!(imported.events, events as u64);

    for stream in Stream::EVENT_STREAMS {
        let (before, after) = (stored(&source, stream).await, stored(&target, stream).await);
        assert!(!before.is_empty(), "{stream:?} has sample events");
        assert_eq!(before, after, "{stream:?} differs after the round trip");
        assert!(
            after
                .iter()
                .all(|m| m.headers.iter().any(|(n, _)| n == "Nats-Msg-Id")
                    || m.body == b"not a frame")
        );
    }
}

#[tokio::test]
async fn filters_limit_what_is_exported() {
    let (_server, bus) = stack().await;
    publish_samples(&bus).await;
    publish_samples(&bus).await;
    publish_samples(&bus).await;
    let dir = TempDir::new("cocoon-export");

    let path = file(&dir, "payments.cocoon");
    let summary = export_to(
        &bus,
        Filter {
            streams: vec!["payments".into()],
            ..Default::default()
        },
        &path,
    )
    .await;
    let (header, trailer) = verify(std::fs::File::open(&path).unwrap()).unwrap();
    assert_eq!(header.streams.len(), 1);
    assert_eq!(header.streams[0].stream, "PAYMENTS");
    assert_eq!(trailer, summary.trailer);
    let per_copy = all_records()
        .iter()
        .filter(|r| r.event.stream() == Stream::Payments)
        .count() as u64;
    assert_eq!(trailer.events, 3 * per_copy);

    // The tasks stream holds one frame per publish: sequences 2..=3 are the last two.
    let path = file(&dir, "tasks-2-3.cocoon");
    let summary = export_to(
        &bus,
        Filter {
            streams: vec!["tasks".into()],
            from_seq: Some(2),
            to_seq: Some(3),
            ..Default::default()
        },
        &path,
    )
    .await;
    let tasks = summary.trailer.stream("TASKS").unwrap();
    assert_eq!((tasks.frames, tasks.first_seq, tasks.last_seq), (2, 2, 3));
    assert!(
        summary.header.filter.contains("seq 2..=3"),
        "{}",
        summary.header.filter
    );

    let path = file(&dir, "results.cocoon");
    let summary = export_to(
        &bus,
        Filter {
            subjects: vec!["results.*.>".into()],
            ..Default::default()
        },
        &path,
    )
    .await;
    assert_eq!(summary.trailer.frames, 3);
    assert_eq!(summary.trailer.streams.len(), 1);

    let path = file(&dir, "future.cocoon");
    let summary = export_to(
        &bus,
        Filter {
            since: Some("2100-01-01T00:00:00Z".into()),
            ..Default::default()
        },
        &path,
    )
    .await;
    assert_eq!(summary.trailer.frames, 0);
    let (_, trailer) = verify(std::fs::File::open(&path).unwrap()).unwrap();
    assert_eq!(trailer.frames, 0);

    // Export moves whole frames: event-level filters are refused.
    let refused = |filter: Filter| {
        export_query(&ExportArgs {
            output: "x".into(),
            filter,
        })
        .unwrap_err()
        .to_string()
    };
    assert!(
        refused(Filter {
            types: vec!["TaskStarted".into()],
            ..Default::default()
        })
        .contains("--type is not supported")
    );
    assert!(
        refused(Filter {
            limit: Some(3),
            ..Default::default()
        })
        .contains("--limit is not supported")
    );
}

#[tokio::test]
async fn a_second_import_is_all_duplicates_and_non_empty_targets_are_refused() {
    let (_source_server, source) = stack().await;
    publish_samples(&source).await;
    let dir = TempDir::new("cocoon-export");
    let path = file(&dir, "log.cocoon");
    let exported = export_to(&source, Filter::default(), &path).await;

    let (_target_server, target) = stack().await;
    import_from(&target, &path, false).await.unwrap();
    let before = stored(&target, Stream::Tasks).await;

    let refused = import_from(&target, &path, false).await.unwrap_err();
    let message = format!("{refused:#}");
    assert!(
        message.contains("is not empty") && message.contains("--allow-non-empty"),
        "{message}"
    );

    let again = import_from(&target, &path, true).await.unwrap();
    assert_eq!(again.duplicates, exported.trailer.frames);
    assert_eq!((again.stored, again.failed, again.events), (0, 0, 0));
    assert_eq!(stored(&target, Stream::Tasks).await, before);
    for stream in Stream::EVENT_STREAMS {
        let info = target
            .jetstream
            .get_stream(stream.name())
            .await
            .unwrap()
            .get_info()
            .await
            .unwrap();
        assert_eq!(
            info.state.messages,
            exported.trailer.stream(stream.name()).unwrap().frames
        );
    }
}

#[tokio::test]
async fn import_needs_provisioned_streams() {
    let (_source_server, source) = stack().await;
    publish_samples(&source).await;
    let dir = TempDir::new("cocoon-export");
    let path = file(&dir, "log.cocoon");
    export_to(
        &source,
        Filter {
            streams: vec!["workers".into()],
            ..Default::default()
        },
        &path,
    )
    .await;

    let bare = NatsServer::start().await;
    let bare = Bus::from_client(bare.client().await, Duration::from_secs(5));
    let err = format!("{:#}", import_from(&bare, &path, false).await.unwrap_err());
    assert!(
        err.contains("WORKERS does not exist") && err.contains("cocoon provision"),
        "{err}"
    );
}

#[tokio::test]
async fn truncated_and_corrupted_files_are_typed_errors_and_publish_nothing() {
    let (_source_server, source) = stack().await;
    publish_samples(&source).await;
    publish_samples(&source).await;
    let dir = TempDir::new("cocoon-export");
    let path = file(&dir, "log.cocoon");
    let exported = export_to(&source, Filter::default(), &path).await;
    let bytes = std::fs::read(&path).unwrap();

    let (_target_server, target) = stack().await;
    let truncated = file(&dir, "truncated.cocoon");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let err = import_from(&target, &truncated, false).await.unwrap_err();
    match err.downcast_ref::<ImportError>() {
        Some(ImportError::Truncated { after_frames }) => {
            assert!(*after_frames < exported.trailer.frames)
        }
        other => panic!("expected Truncated, got {other:?} ({err:#})"),
    }
    assert!(format!("{err:#}").contains("truncated"));

    let flipped = file(&dir, "flipped.cocoon");
    let mut damaged = bytes.clone();
    damaged[bytes.len() / 2] ^= 0x10;
    std::fs::write(&flipped, &damaged).unwrap();
    let err = import_from(&target, &flipped, false).await.unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<ImportError>(),
            Some(ImportError::Corrupt { .. } | ImportError::Truncated { .. })
        ),
        "{err:#}"
    );

    let foreign = file(&dir, "foreign.cocoon");
    std::fs::write(&foreign, b"TASKS,1,tasks.1,hello\n").unwrap();
    let err = import_from(&target, &foreign, false).await.unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<ImportError>(),
            Some(ImportError::BadMagic { .. })
        ),
        "{err:#}"
    );

    // Nothing was published from any of them.
    for stream in Stream::EVENT_STREAMS {
        assert!(stored(&target, stream).await.is_empty(), "{stream:?}");
    }
}

#[test]
fn the_binary_exports_and_imports_with_the_right_exit_codes() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (source_server, source) = rt.block_on(stack());
    let (target_server, target) = rt.block_on(stack());
    rt.block_on(publish_samples(&source));
    let dir = TempDir::new("cocoon-export");
    let path = file(&dir, "log.cocoon");
    let bin = env!("CARGO_BIN_EXE_cocoon");
    let cocoon = |url: &str, args: &[&str]| {
        std::process::Command::new(bin)
            .args(["--nats-url", url, "events"])
            .args(args)
            .output()
            .unwrap()
    };
    let path_arg = path.to_str().unwrap();

    let out = cocoon(&source_server.url(), &["export", "--output", path_arg]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("exported ") && stderr.contains("frames"),
        "{stderr}"
    );

    let out = cocoon(&target_server.url(), &["import", "--input", path_arg]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("0 duplicates, 0 failed"), "{stderr}");
    for stream in Stream::EVENT_STREAMS {
        assert_eq!(
            rt.block_on(stored(&source, stream)),
            rt.block_on(stored(&target, stream))
        );
    }

    // Again: the target is no longer empty.
    let out = cocoon(&target_server.url(), &["import", "--input", path_arg]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-non-empty"));
    let out = cocoon(
        &target_server.url(),
        &["import", "--input", path_arg, "--allow-non-empty"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(" 0 stored"), "{stderr}");

    // To stdout, then a damaged copy.
    let out = cocoon(
        &source_server.url(),
        &["export", "--output", "-", "--stream", "results"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let truncated = file(&dir, "cut.cocoon");
    std::fs::write(&truncated, &out.stdout[..out.stdout.len() - 8]).unwrap();
    let out = cocoon(
        &target_server.url(),
        &["import", "--input", truncated.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot be imported") && stderr.contains("truncated"),
        "{stderr}"
    );

    let out = cocoon(
        &source_server.url(),
        &["export", "--output", path_arg, "--type", "TaskStarted"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--type is not supported"));
    let out = cocoon(&target_server.url(), &["import", "--input", "-"]);
    assert_eq!(out.status.code(), Some(1));
}

/// Projects everything in `server`'s log into `schema` of `db` and returns the tables' fingerprints.
async fn project(
    server: &NatsServer,
    db: &tests::TestDb,
    schema: &str,
) -> std::collections::BTreeMap<String, projector::verify::TableSum> {
    let mut config = projector::ProjectorConfig::new(server.url(), db.url());
    config.schema = schema.into();
    config.fetch_wait = Duration::from_millis(300);
    projector::run(config, tokio_util::sync::CancellationToken::new(), true)
        .await
        .unwrap();
    let tables: Vec<&str> = projector::Projection::ALL
        .iter()
        .flat_map(|p| p.tables().iter().copied())
        .collect();
    projector::verify::fingerprint(&db.client().await, schema, &tables)
        .await
        .unwrap()
}

#[tokio::test]
async fn export_then_import_reproduces_the_same_read_models() {
    let (source, source_bus) = stack().await;
    let publisher =
        Publisher::new(source_bus.jetstream.clone(), PublisherConfig::default()).unwrap();
    for r in events::sample::lifecycle(30, 3) {
        drop(publisher.publish(&r).await.unwrap());
    }
    publisher.flush().await.unwrap();
    let dir = TempDir::new("cocoon-export");
    let path = file(&dir, "log.cocoon");
    export_to(&source_bus, Filter::default(), &path).await;

    let (target, target_bus) = stack().await;
    let summary = import_from(&target_bus, &path, false).await.unwrap();
    assert_eq!(summary.duplicates, 0);

    let db = tests::TestDb::create().await;
    let from_source = project(&source, &db, "from_source").await;
    let from_import = project(&target, &db, "from_import").await;
    assert_eq!(from_source["tasks"].rows, 30);
    assert_eq!(from_import, from_source);
}
