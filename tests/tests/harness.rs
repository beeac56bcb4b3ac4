//! Tests of the test harness itself.
//!
//! A real nats-server with JetStream keeps its store across a restart; per-test
//! Postgres databases are distinct, usable and dropped afterwards.

use async_nats::jetstream;
use tests::{NatsServer, TempDir, TestDb};

#[tokio::test]
async fn nats_server_runs_jetstream_and_keeps_its_store_across_a_restart() {
    let mut server = NatsServer::start().await;
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));

    let js = jetstream::new(server.client().await);
    js.query_account()
        .await
        .expect("JetStream is enabled on the harness server");
    js.create_stream(jetstream::stream::Config {
        name: "HARNESS".to_string(),
        subjects: vec!["harness.>".to_string()],
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("create stream");
    js.publish("harness.one", "persisted".into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    assert!(
        server.store_dir().join("jetstream").is_dir(),
        "JetStream writes into the harness's store dir"
    );

    let port = server.port();
    server.restart().await;
    assert_eq!(server.port(), port, "a restart keeps the port");

    // A new client, so the check does not depend on reconnect timing.
    let js = jetstream::new(server.client().await);
    let mut stream = js
        .get_stream("HARNESS")
        .await
        .expect("the stream survives a restart");
    let info = stream.info().await.expect("stream info");
    assert_eq!(
        info.state.messages, 1,
        "an acked message survives a graceful restart"
    );
}

#[tokio::test]
async fn extra_arguments_reach_the_server() {
    // Limits such as max_payload have no command-line flag: a config file
    // carries them.
    let dir = TempDir::new("cocoon-test-conf");
    let conf = dir.path().join("small.conf");
    std::fs::write(&conf, "max_payload: 1024\n").expect("write conf");

    let server = NatsServer::start_with_args(&["-c", conf.to_str().expect("utf-8 path")]).await;
    let client = server.client().await;
    assert_eq!(client.server_info().max_payload, 1024);
}

/// A documented pitfall: nats-server rejects a `store_dir` in the config file
/// together with `-sd`, which the harness always passes.
#[tokio::test]
#[should_panic(expected = "Duplicate 'store_dir' configuration")]
async fn a_config_file_with_a_store_dir_is_rejected() {
    let dir = TempDir::new("cocoon-test-conf");
    let conf = dir.path().join("store.conf");
    std::fs::write(&conf, "jetstream { store_dir: \"/nonexistent\" }\n").expect("write conf");
    NatsServer::start_with_args(&["-c", conf.to_str().expect("utf-8 path")]).await;
}

#[tokio::test]
async fn nats_server_cleans_up_its_temp_dir_on_drop() {
    let server = NatsServer::start().await;
    let dir = server
        .store_dir()
        .parent()
        .expect("the store lives in the harness temp dir")
        .to_path_buf();
    assert!(dir.is_dir());
    drop(server);
    assert!(!dir.exists(), "{} is removed on drop", dir.display());
}

#[tokio::test]
async fn test_databases_are_distinct_usable_and_dropped() {
    let a = TestDb::create().await;
    let b = TestDb::create().await;
    assert_ne!(a.name(), b.name());
    assert_ne!(a.url(), b.url());

    for db in [&a, &b] {
        let client = db.client().await;
        let row = client
            .query_one("select 1::int4, current_database()", &[])
            .await
            .expect("select 1");
        assert_eq!(row.get::<_, i32>(0), 1);
        assert_eq!(row.get::<_, String>(1), db.name());
    }

    // A table made in one is not visible in the other.
    a.client()
        .await
        .batch_execute("create table only_in_a (id int)")
        .await
        .expect("create table");
    let in_b: i64 = b
        .client()
        .await
        .query_one(
            "select count(*) from information_schema.tables where table_name = 'only_in_a'",
            &[],
        )
        .await
        .expect("query b")
        .get(0);
    assert_eq!(in_b, 0);

    // Dropping works even with a session still open (WITH (FORCE)), and is
    // done when drop returns.
    let name = a.name().to_string();
    let still_open = a.client().await;
    drop(a);
    let (admin, connection) =
        tokio_postgres::connect(&tests::admin_pg_url(), tokio_postgres::NoTls)
            .await
            .expect("admin connection");
    tokio::spawn(connection);
    let left: i64 = admin
        .query_one(
            "select count(*) from pg_database where datname = $1",
            &[&name],
        )
        .await
        .expect("query pg_database")
        .get(0);
    assert_eq!(left, 0, "database {name} is dropped");
    assert!(
        still_open.simple_query("select 1").await.is_err(),
        "sessions of the dropped database are terminated"
    );
    drop(b);
}
