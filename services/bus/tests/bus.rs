//! The bus against a real nats-server with JetStream: provisioning, the batching publisher, the frame consumer.

use std::time::Duration;

use async_nats::jetstream;
use bus::{
    Bus, ConsumerSpec, FrameConsumer, ProvisionOutcome, PublishError, Publisher, PublisherConfig,
    provision_streams,
};
use events::frame::HEADER_EVENT_COUNT;
use events::sample::{all_records, task_submitted_of_size};
use events::{EventRecord, Partitions, Stream};
use futures_util::FutureExt;
use tests::NatsServer;

const DEADLINE: Duration = Duration::from_secs(10);
const NEVER: Duration = Duration::from_secs(3600);

async fn bus(server: &NatsServer) -> Bus {
    Bus::from_client(server.client().await, Duration::from_secs(5))
}

/// A TaskSubmitted for one fixed task, so every event lands on the same subject.
fn same_subject_records(n: usize) -> Vec<EventRecord> {
    let template = task_submitted_of_size(350);
    (0..n)
        .map(|_| {
            let mut r = template.clone();
            r.envelope.event_id = events::EventId::new();
            r
        })
        .collect()
}

/// The frames stored on a stream, as (subject, event count) in order.
async fn stored_frames(js: &jetstream::Context, stream: Stream) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let s = js.get_stream(stream.name()).await.unwrap();
    let last = s.get_info().await.unwrap().state.last_sequence;
    for seq in 1..=last {
        let m = s.get_raw_message(seq).await.unwrap();
        let count = m
            .headers
            .get(HEADER_EVENT_COUNT)
            .unwrap()
            .as_str()
            .parse()
            .unwrap();
        out.push((m.subject.to_string(), count));
    }
    out
}

#[tokio::test]
async fn provisioning_twice_changes_nothing() {
    let server = NatsServer::start().await;
    let bus = bus(&server).await;
    let first = provision_streams(&bus.jetstream, 1).await.unwrap();
    assert_eq!(first.count(ProvisionOutcome::Created), Stream::ALL.len());

    let mut before = Vec::new();
    for stream in Stream::ALL {
        let info = bus
            .jetstream
            .get_stream(stream.name())
            .await
            .unwrap()
            .get_info()
            .await
            .unwrap();
        before.push((info.config, info.created));
    }
    let second = provision_streams(&bus.jetstream, 1).await.unwrap();
    assert_eq!(second.count(ProvisionOutcome::Unchanged), Stream::ALL.len());
    for (stream, (config, created)) in Stream::ALL.into_iter().zip(before) {
        let info = bus
            .jetstream
            .get_stream(stream.name())
            .await
            .unwrap()
            .get_info()
            .await
            .unwrap();
        assert_eq!(info.config, config, "{stream} changed");
        assert_eq!(info.created, created, "{stream} was recreated");
    }

    // A drifted setting is put back, and only that stream is touched.
    let mut config = bus
        .jetstream
        .get_stream("TASKS")
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap()
        .config;
    config.max_age = Duration::from_secs(3600);
    bus.jetstream.update_stream(config).await.unwrap();
    let third = provision_streams(&bus.jetstream, 1).await.unwrap();
    assert_eq!(third.count(ProvisionOutcome::Updated), 1);
    assert_eq!(third.streams[0], (Stream::Tasks, ProvisionOutcome::Updated));

    assert!(
        provision_streams(&bus.jetstream, 2).await.is_err(),
        "2 replicas is not a valid choice"
    );
}

#[tokio::test]
async fn publisher_flushes_on_count() {
    let server = NatsServer::start().await;
    let bus = bus(&server).await;
    provision_streams(&bus.jetstream, 1).await.unwrap();
    let config = PublisherConfig {
        max_events: 10,
        max_bytes: usize::MAX,
        linger: NEVER,
        ..Default::default()
    };
    let publisher = Publisher::new(bus.jetstream.clone(), config).unwrap();

    let mut receipts = Vec::new();
    for r in same_subject_records(25) {
        receipts.push(publisher.publish(&r).await.unwrap());
    }
    // The first 20 events filled two frames and went out without any flush or linger.
    let mut positions = Vec::new();
    for receipt in receipts.drain(..20) {
        positions.push(
            tokio::time::timeout(DEADLINE, receipt)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(positions[0].sequence, 1);
    assert_eq!(positions[9].index, 9);
    assert_eq!(positions[10].sequence, 2);
    assert_eq!(positions[10].index, 0);
    assert_eq!(publisher.pending(), 5, "the last 5 wait in an open frame");
    assert_eq!(stored_frames(&bus.jetstream, Stream::Tasks).await.len(), 2);

    publisher.flush().await.unwrap();
    let frames = stored_frames(&bus.jetstream, Stream::Tasks).await;
    assert_eq!(
        frames.iter().map(|f| f.1).collect::<Vec<_>>(),
        vec![10, 10, 5]
    );
    for receipt in receipts {
        assert_eq!(receipt.await.unwrap().sequence, 3);
    }
}

#[tokio::test]
async fn publisher_flushes_on_bytes() {
    let server = NatsServer::start().await;
    let bus = bus(&server).await;
    provision_streams(&bus.jetstream, 1).await.unwrap();
    let records = same_subject_records(10);
    let size = events::frame::encode_event(&records[0]).unwrap().len();
    // Room for three events (plus the frame header), not four.
    let config = PublisherConfig {
        max_events: 1000,
        max_bytes: 3 * size + 5,
        linger: NEVER,
        ..Default::default()
    };
    let publisher = Publisher::new(bus.jetstream.clone(), config).unwrap();
    let mut receipts = Vec::new();
    for r in &records {
        receipts.push(publisher.publish(r).await.unwrap());
    }
    // Three frames closed on bytes before any flush.
    let first = tokio::time::timeout(DEADLINE, receipts.remove(0))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.sequence, 1);
    publisher.flush().await.unwrap();
    let frames = stored_frames(&bus.jetstream, Stream::Tasks).await;
    assert_eq!(
        frames.iter().map(|f| f.1).collect::<Vec<_>>(),
        vec![3, 3, 3, 1]
    );
}

#[tokio::test]
async fn publisher_flushes_on_linger() {
    let server = NatsServer::start().await;
    let bus = bus(&server).await;
    provision_streams(&bus.jetstream, 1).await.unwrap();
    let config = PublisherConfig {
        max_events: 1000,
        max_bytes: usize::MAX,
        linger: Duration::from_millis(20),
        ..Default::default()
    };
    let publisher = Publisher::new(bus.jetstream.clone(), config).unwrap();
    let records = same_subject_records(3);
    let mut receipts = Vec::new();
    for r in &records {
        receipts.push(publisher.publish(r).await.unwrap());
    }
    // No flush, no count or byte limit: only the linger timer can close this frame.
    for receipt in receipts {
        let position = tokio::time::timeout(DEADLINE, receipt)
            .await
            .expect("linger never fired")
            .unwrap();
        assert_eq!(position.sequence, 1);
    }
    let subject = records[0].subject(Partitions::DEFAULT).to_string();
    assert_eq!(
        stored_frames(&bus.jetstream, Stream::Tasks).await,
        vec![(subject, 3)]
    );
}

#[tokio::test]
async fn a_failed_publish_reaches_the_receipt_and_the_flush() {
    let server = NatsServer::start().await;
    let bus = bus(&server).await;
    // No streams provisioned: nothing takes the subject.
    let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default()).unwrap();
    let receipt = publisher
        .publish(&same_subject_records(1)[0])
        .await
        .unwrap();
    let flushed = publisher.flush().await;
    match flushed {
        Err(PublishError::Failed {
            frames: 1,
            events: 1,
            first,
        }) => {
            assert!(matches!(*first, PublishError::NoStream { .. }), "{first}");
        }
        other => panic!("flush should report the failure, got {other:?}"),
    }
    assert!(matches!(receipt.await, Err(PublishError::NoStream { .. })));
    // The failure is reported once; the next flush starts clean.
    publisher.flush().await.unwrap();
    assert_eq!(publisher.pending(), 0);
}

#[tokio::test]
async fn a_frame_the_server_refuses_as_too_large_is_reported() {
    let conf = std::env::temp_dir().join(format!("cocoon-small-payload-{}.conf", uuid_like()));
    std::fs::write(&conf, "max_payload: 4096\n").unwrap();
    let server = NatsServer::start_with_args(&["-c", conf.to_str().unwrap()]).await;
    std::fs::remove_file(&conf).unwrap();
    let bus = bus(&server).await;
    provision_streams(&bus.jetstream, 1).await.unwrap();
    // Incompressible input, so the frame stays larger than the server's 4 KiB limit.
    let mut record = same_subject_records(1).remove(0);
    if let events::Event::TaskSubmitted(t) = &mut record.event {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        t.spec.input = events::payload::Blob::Inline(
            (0..8192)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect(),
        );
    }
    let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default()).unwrap();
    let receipt = publisher.publish(&record).await.unwrap();
    assert!(publisher.flush().await.is_err());
    assert!(receipt.await.is_err());
}

#[tokio::test]
async fn publisher_pushes_back_when_the_window_is_full() {
    let server = NatsServer::start().await;
    let bus = bus(&server).await;
    provision_streams(&bus.jetstream, 1).await.unwrap();
    let config = PublisherConfig {
        max_pending_events: 5,
        linger: NEVER,
        ..Default::default()
    };
    let publisher = Publisher::new(bus.jetstream.clone(), config).unwrap();
    let records = same_subject_records(6);
    for r in &records[..5] {
        drop(publisher.publish(r).await.unwrap());
    }
    // The window is full: the sixth publish cannot even start.
    assert!(publisher.publish(&records[5]).now_or_never().is_none());
    publisher.flush().await.unwrap();
    let receipt = publisher
        .publish(&records[5])
        .now_or_never()
        .expect("room after the flush")
        .unwrap();
    publisher.flush().await.unwrap();
    assert_eq!(receipt.await.unwrap().sequence, 2);
}

/// An abandoned publisher sends nothing more: its open frames are dropped, later publishes are refused, and
/// the flush reports what was not sent.
#[tokio::test]
async fn an_abandoned_publisher_sends_nothing_more() {
    let server = NatsServer::start().await;
    let bus = bus(&server).await;
    provision_streams(&bus.jetstream, 1).await.unwrap();
    let config = PublisherConfig {
        linger: Duration::from_secs(30),
        ..Default::default()
    };
    let publisher = Publisher::new(bus.jetstream.clone(), config).unwrap();
    let receipts: Vec<_> = {
        let mut v = Vec::new();
        for r in same_subject_records(3) {
            v.push(publisher.publish(&r).await.unwrap());
        }
        v
    };
    publisher.abandon();
    assert!(matches!(
        publisher.publish(&same_subject_records(1)[0]).await,
        Err(PublishError::Closed)
    ));
    for receipt in receipts {
        assert!(matches!(receipt.await, Err(PublishError::Closed)));
    }
    assert!(publisher.flush().await.is_err());
    assert_eq!(publisher.pending(), 0);
    drop(publisher);
    assert!(
        stored_frames(&bus.jetstream, Stream::Tasks)
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn a_repeated_frame_is_stored_once() {
    let server = NatsServer::start().await;
    let bus = bus(&server).await;
    provision_streams(&bus.jetstream, 1).await.unwrap();
    let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default()).unwrap();
    let record = same_subject_records(1).remove(0);
    let first = publisher.publish(&record).await.unwrap();
    publisher.flush().await.unwrap();
    let second = publisher.publish(&record).await.unwrap();
    publisher.flush().await.unwrap();
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert!(!first.duplicate);
    assert!(second.duplicate, "same Nats-Msg-Id within the window");
    assert_eq!(first.sequence, second.sequence);
    assert_eq!(stored_frames(&bus.jetstream, Stream::Tasks).await.len(), 1);
}

/// An event too large for a frame is refused with a typed error, and the frame it would have opened is not
/// sent empty: the next event on the subject opens a frame of its own.
#[tokio::test]
async fn an_event_too_large_for_a_frame_is_refused_and_sends_nothing() {
    let server = NatsServer::start().await;
    let bus = bus(&server).await;
    provision_streams(&bus.jetstream, 1).await.unwrap();
    let config = PublisherConfig {
        linger: NEVER,
        codec: events::CodecConfig {
            max_decoded_bytes: 1_000,
            ..Default::default()
        },
        ..Default::default()
    };
    let publisher = Publisher::new(bus.jetstream.clone(), config).unwrap();
    let refused = publisher.publish(&task_submitted_of_size(2_000)).await;
    assert!(
        matches!(refused, Err(PublishError::Encode(_))),
        "{refused:?}"
    );
    publisher.flush().await.unwrap();
    assert_eq!(publisher.pending(), 0);
    assert!(
        stored_frames(&bus.jetstream, Stream::Tasks)
            .await
            .is_empty()
    );
    let fits = publisher
        .publish(&task_submitted_of_size(350))
        .await
        .unwrap();
    publisher.flush().await.unwrap();
    assert_eq!(fits.await.unwrap().sequence, 1);
    assert_eq!(stored_frames(&bus.jetstream, Stream::Tasks).await.len(), 1);
}

/// A caller that retries an event after a timeout may see it batched with events never sent before. The
/// server must store that frame (the retried event twice in the log, which the read models absorb), not
/// drop it as a duplicate of the stored frame that began with the same event, losing the new ones.
#[tokio::test]
async fn a_retried_event_batched_with_new_ones_is_not_dropped() {
    let server = NatsServer::start().await;
    let bus = bus(&server).await;
    provision_streams(&bus.jetstream, 1).await.unwrap();
    let config = PublisherConfig {
        max_events: 3,
        linger: NEVER,
        ..Default::default()
    };
    let publisher = Publisher::new(bus.jetstream.clone(), config).unwrap();
    let records = same_subject_records(4);
    let (stored, fresh) = (&records[..3], &records[3]);
    let mut first = Vec::new();
    for r in stored {
        first.push(publisher.publish(r).await.unwrap());
    }
    publisher.flush().await.unwrap();
    // The same three again: the same frame, deduplicated.
    let mut again = Vec::new();
    for r in stored {
        again.push(publisher.publish(r).await.unwrap());
    }
    publisher.flush().await.unwrap();
    // The first event retried, batched with a new one.
    let retried = publisher.publish(&stored[0]).await.unwrap();
    let new = publisher.publish(fresh).await.unwrap();
    publisher.flush().await.unwrap();

    let first = first.pop().unwrap().await.unwrap();
    let again = again.pop().unwrap().await.unwrap();
    assert!(!first.duplicate);
    assert!(again.duplicate, "an identical frame is deduplicated");
    assert_eq!(again.sequence, first.sequence);
    let (retried, new) = (retried.await.unwrap(), new.await.unwrap());
    assert!(!new.duplicate, "the new event was dropped as a duplicate");
    assert_eq!((retried.sequence, retried.index), (2, 0));
    assert_eq!((new.sequence, new.index), (2, 1));
    let frames = stored_frames(&bus.jetstream, Stream::Tasks).await;
    assert_eq!(frames.iter().map(|f| f.1).collect::<Vec<_>>(), vec![3, 2]);
}

#[tokio::test]
async fn consumer_hands_frames_in_order_and_acks_the_batch() {
    let server = NatsServer::start().await;
    let bus = bus(&server).await;
    provision_streams(&bus.jetstream, 1).await.unwrap();
    let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default()).unwrap();
    // Every sample type, on every stream, plus 200 tasks spread over partitions.
    let mut sent: Vec<EventRecord> = all_records();
    sent.extend((0..200).map(|_| task_submitted_of_size(350)));
    for r in &sent {
        drop(publisher.publish(r).await.unwrap());
    }
    publisher.flush().await.unwrap();

    let codec = events::CodecConfig::default();
    let spec = ConsumerSpec::new(Stream::Tasks, "test-tasks");
    let consumer = FrameConsumer::bind(&bus.jetstream, &spec).await.unwrap();
    let mut received = Vec::new();
    let mut last_seq = 0;
    while received.len()
        < sent
            .iter()
            .filter(|r| r.event.stream() == Stream::Tasks)
            .count()
    {
        let batch = consumer.fetch(8, Duration::from_secs(2)).await.unwrap();
        assert!(
            !batch.is_empty(),
            "events missing after {} received",
            received.len()
        );
        for frame in &batch.frames {
            assert!(
                frame.stream_sequence > last_seq,
                "frames arrive in stream order"
            );
            last_seq = frame.stream_sequence;
            received.extend(frame.decode(&codec).unwrap());
        }
        batch.ack().await.unwrap();
    }
    let expected: Vec<_> = sent
        .iter()
        .filter(|r| r.event.stream() == Stream::Tasks)
        .cloned()
        .collect();
    let by_id = |v: &Vec<EventRecord>| {
        let mut v = v.clone();
        v.sort_by_key(|r| r.envelope.event_id);
        v
    };
    assert_eq!(by_id(&received), by_id(&expected));

    // Acked: a consumer bound again under the same name gets nothing more.
    drop(consumer);
    let again = FrameConsumer::bind(&bus.jetstream, &spec).await.unwrap();
    assert!(
        again
            .fetch(8, Duration::from_millis(300))
            .await
            .unwrap()
            .is_empty()
    );
}

/// A batch that has frames but is not full waits for frames that arrive within the gather time, and returns
/// when it is full, not at the end of that time.
#[tokio::test]
async fn a_gathering_fetch_waits_for_more_frames() {
    let server = NatsServer::start().await;
    let bus = bus(&server).await;
    provision_streams(&bus.jetstream, 1).await.unwrap();
    let config = PublisherConfig {
        max_events: 1,
        ..Default::default()
    };
    let publisher = Publisher::new(bus.jetstream.clone(), config).unwrap();
    let records = same_subject_records(5);
    for r in &records[..3] {
        drop(publisher.publish(r).await.unwrap());
    }
    publisher.flush().await.unwrap();
    let consumer = FrameConsumer::bind(&bus.jetstream, &ConsumerSpec::new(Stream::Tasks, "gather"))
        .await
        .unwrap();
    let later = records[3..].to_vec();
    let late_publisher = publisher.clone();
    let publishing = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        for r in &later {
            drop(late_publisher.publish(r).await.unwrap());
        }
        late_publisher.flush().await.unwrap();
    });
    let gather = Duration::from_secs(60);
    let batch = tokio::time::timeout(
        DEADLINE,
        consumer.fetch_gathering(5, Duration::from_secs(1), gather),
    )
    .await
    .expect("a full batch returns before the gather time ends")
    .unwrap();
    publishing.await.unwrap();
    let sequences: Vec<u64> = batch.frames.iter().map(|f| f.stream_sequence).collect();
    assert_eq!(sequences, vec![1, 2, 3, 4, 5]);
    batch.ack().await.unwrap();
}

#[tokio::test]
async fn an_unacked_batch_is_delivered_again() {
    let server = NatsServer::start().await;
    let bus = bus(&server).await;
    provision_streams(&bus.jetstream, 1).await.unwrap();
    let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default()).unwrap();
    for r in same_subject_records(3) {
        drop(publisher.publish(&r).await.unwrap());
    }
    publisher.flush().await.unwrap();
    let spec = ConsumerSpec {
        ack_wait: Duration::from_millis(500),
        ..ConsumerSpec::new(Stream::Tasks, "redeliver")
    };
    let consumer = FrameConsumer::bind(&bus.jetstream, &spec).await.unwrap();
    let first = consumer.fetch(10, Duration::from_secs(2)).await.unwrap();
    assert_eq!(first.frames.len(), 1);
    let seq = first.frames[0].stream_sequence;
    drop(first); // crashed before commit: no ack
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let again = consumer.fetch(10, Duration::from_secs(1)).await.unwrap();
        if let Some(frame) = again.frames.first() {
            assert_eq!(frame.stream_sequence, seq);
            again.ack().await.unwrap();
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never redelivered");
    }
}

#[tokio::test]
async fn a_delivery_the_consumer_never_received_is_a_gap() {
    let server = NatsServer::start().await;
    let bus = bus(&server).await;
    provision_streams(&bus.jetstream, 1).await.unwrap();
    let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default()).unwrap();
    for r in same_subject_records(3) {
        drop(publisher.publish(&r).await.unwrap());
        publisher.flush().await.unwrap();
    }
    let spec = ConsumerSpec::new(Stream::Tasks, "gappy");
    let consumer = FrameConsumer::bind(&bus.jetstream, &spec).await.unwrap();
    let first = consumer.fetch(1, Duration::from_secs(2)).await.unwrap();
    assert_eq!(first.frames.len(), 1);

    // A pull request whose answer another subscriber takes, as one given up on during a reconnect: the server
    // delivers the next frame there and counts it delivered.
    server
        .steal_next_delivery(Stream::Tasks.name(), "gappy")
        .await;
    // Acking the next frame (AckAll) would ack the lost one unseen: the fetch says so instead.
    match consumer.fetch(10, Duration::from_secs(2)).await {
        Err(bus::ConsumeError::Gap {
            expected_after,
            got,
            ..
        }) => assert_eq!((expected_after, got), (1, 3)),
        other => panic!("expected a gap, got {other:?}"),
    }
}

/// Publishes `n` frames of one event each on one subject of TASKS, in stream sequences 1..=n.
async fn publish_frames(bus: &Bus, n: usize) {
    let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default()).unwrap();
    for r in same_subject_records(n) {
        drop(publisher.publish(&r).await.unwrap());
        publisher.flush().await.unwrap();
    }
}

fn sequences(batch: &bus::FetchedBatch) -> Vec<u64> {
    batch.frames.iter().map(|f| f.stream_sequence).collect()
}

/// A process that received frames and died before acking them: the next process bound to the durable gets
/// them again first. (Otherwise its first ack, covering every earlier frame, would ack them unseen.)
#[tokio::test]
async fn frames_a_dead_process_never_acked_come_first_to_the_next_one() {
    let server = NatsServer::start().await;
    let bus = bus(&server).await;
    provision_streams(&bus.jetstream, 1).await.unwrap();
    publish_frames(&bus, 5).await;
    let spec = ConsumerSpec::new(Stream::Tasks, "restarted");
    let first = FrameConsumer::bind(&bus.jetstream, &spec).await.unwrap();
    let done = first.fetch(1, Duration::from_secs(2)).await.unwrap();
    assert_eq!(sequences(&done), vec![1]);
    done.ack().await.unwrap();
    let unfinished = first.fetch(2, Duration::from_secs(2)).await.unwrap();
    assert_eq!(sequences(&unfinished), vec![2, 3]);
    drop((unfinished, first)); // died before committing 2 and 3

    let next = FrameConsumer::bind(&bus.jetstream, &spec).await.unwrap();
    let batch = next.fetch(10, Duration::from_secs(2)).await.unwrap();
    assert_eq!(sequences(&batch), vec![2, 3, 4, 5]);
    batch.ack().await.unwrap();
    // Bound again with nothing unacked: it goes on where it was.
    publish_frames(&bus, 1).await;
    let after = FrameConsumer::bind(&bus.jetstream, &spec).await.unwrap();
    assert_eq!(
        sequences(&after.fetch(10, Duration::from_secs(2)).await.unwrap()),
        vec![6]
    );
}

/// Replicas of a service on one shared durable: each takes its own frames without seeing the other's as a
/// gap, each ack covers only its own frames, and what a replica took and never acked goes to another after
/// the ack wait. A durable made for one owner (AckAll) is made shared after its ack floor when a replica binds.
#[tokio::test]
async fn replicas_on_a_shared_durable_ack_only_their_own_frames() {
    let server = NatsServer::start().await;
    let bus = bus(&server).await;
    provision_streams(&bus.jetstream, 1).await.unwrap();
    publish_frames(&bus, 5).await;
    // An older deployment's durable, of one owner, that acked frame 1.
    let owned = ConsumerSpec::new(Stream::Tasks, "replicas");
    let old = FrameConsumer::bind(&bus.jetstream, &owned).await.unwrap();
    let batch = old.fetch(1, Duration::from_secs(2)).await.unwrap();
    assert_eq!(sequences(&batch), vec![1]);
    batch.ack().await.unwrap();
    drop(old);

    let spec = ConsumerSpec {
        ack_wait: Duration::from_millis(500),
        ..ConsumerSpec::new(Stream::Tasks, "replicas").shared()
    };
    let a = FrameConsumer::bind(&bus.jetstream, &spec).await.unwrap();
    let b = FrameConsumer::bind(&bus.jetstream, &spec).await.unwrap();
    let taken_by_a = a.fetch(2, Duration::from_secs(2)).await.unwrap();
    assert_eq!(sequences(&taken_by_a), vec![2, 3]);
    let taken_by_b = b.fetch(1, Duration::from_secs(2)).await.unwrap();
    assert_eq!(sequences(&taken_by_b), vec![4]);
    taken_by_b.ack().await.unwrap();
    drop((taken_by_a, a)); // replica a died before acking 2 and 3

    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while got.len() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "got only {got:?}");
        let batch = b.fetch(10, Duration::from_millis(500)).await.unwrap();
        got.extend(sequences(&batch));
        batch.ack().await.unwrap();
    }
    got.sort_unstable();
    assert_eq!(got, vec![2, 3, 5], "b's ack of 4 did not ack a's 2 and 3");
    let info = bus
        .jetstream
        .get_stream(Stream::Tasks.name())
        .await
        .unwrap()
        .consumer_info("replicas")
        .await
        .unwrap();
    assert_eq!(
        info.config.ack_policy,
        async_nats::jetstream::consumer::AckPolicy::Explicit
    );
    assert_eq!(info.num_ack_pending, 0);
}

#[tokio::test]
async fn undecodable_frames_come_back_as_typed_errors() {
    let server = NatsServer::start().await;
    let bus = bus(&server).await;
    provision_streams(&bus.jetstream, 1).await.unwrap();
    // A raw message that is not a frame (no headers, garbage body).
    bus.jetstream
        .publish("tasks.0.operator", "garbage".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let consumer = FrameConsumer::bind(&bus.jetstream, &ConsumerSpec::new(Stream::Tasks, "poison"))
        .await
        .unwrap();
    let batch = consumer.fetch(10, Duration::from_secs(2)).await.unwrap();
    let err = batch.frames[0]
        .decode(&events::CodecConfig::default())
        .unwrap_err();
    assert_eq!(err.kind(), "missing_header");
}

fn uuid_like() -> String {
    events::EventId::new().to_string()
}
