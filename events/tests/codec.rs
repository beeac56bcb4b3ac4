//! Frame codec behaviour: round trips of every event type, compression threshold, typed errors on bad input.

use events::frame::{
    HEADER_ENCODING, HEADER_EVENT_COUNT, HEADER_SCHEMA, decode_event, encode_event,
};
use events::sample::{all_records, task_submitted_of_size};
use events::{
    CodecConfig, DecodeError, EVENT_KINDS, Encoding, FrameHeaders, PayloadError, decode_frame,
    encode_frame,
};

fn config() -> CodecConfig {
    CodecConfig::default()
}

#[test]
fn every_event_type_round_trips_alone_and_in_one_frame() {
    let records = all_records();
    let kinds: Vec<_> = records.iter().map(|r| r.event.kind()).collect();
    let registered: Vec<_> = EVENT_KINDS.iter().map(|k| k.name).collect();
    assert_eq!(
        kinds, registered,
        "samples must cover every registered type in order"
    );

    for record in &records {
        let frame = encode_frame(config(), std::slice::from_ref(record)).unwrap();
        let decoded = decode_frame(&config(), &frame.headers, &frame.body).unwrap();
        assert_eq!(decoded, vec![record.clone()], "{}", record.event.kind());
        assert_eq!(
            record.event.stream(),
            record.subject(Default::default()).stream().unwrap()
        );
    }

    let frame = encode_frame(config(), &records).unwrap();
    assert_eq!(frame.headers.event_count as usize, records.len());
    assert_eq!(
        decode_frame(&config(), &frame.headers, &frame.body).unwrap(),
        records
    );
}

#[test]
fn frames_above_the_threshold_are_compressed_and_below_are_not() {
    let small = task_submitted_of_size(350);
    let frame = encode_frame(config(), std::slice::from_ref(&small)).unwrap();
    assert!(frame.raw_len <= 1024);
    assert_eq!(frame.headers.encoding, Encoding::MsgPack);
    assert_eq!(frame.body.len(), frame.raw_len);

    let batch: Vec<_> = (0..50).map(|_| task_submitted_of_size(350)).collect();
    let frame = encode_frame(config(), &batch).unwrap();
    assert!(frame.raw_len > 1024);
    assert_eq!(frame.headers.encoding, Encoding::MsgPackZstd);
    assert!(
        frame.body.len() < frame.raw_len,
        "zstd should shrink a frame of similar events"
    );
    assert_eq!(
        decode_frame(&config(), &frame.headers, &frame.body).unwrap(),
        batch
    );

    // The threshold is configurable, and is a strict "greater than".
    let exact = CodecConfig {
        compress_threshold: frame.raw_len,
        ..config()
    };
    assert_eq!(
        encode_frame(exact, &batch).unwrap().headers.encoding,
        Encoding::MsgPack
    );
    let below = CodecConfig {
        compress_threshold: frame.raw_len - 1,
        ..config()
    };
    assert_eq!(
        encode_frame(below, &batch).unwrap().headers.encoding,
        Encoding::MsgPackZstd
    );
}

#[test]
fn headers_round_trip_and_are_validated() {
    let frame = encode_frame(config(), &all_records()).unwrap();
    let pairs = frame.headers.pairs();
    let get = |name: &str| {
        pairs
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(FrameHeaders::parse(get).unwrap(), frame.headers);

    assert_eq!(
        FrameHeaders::parse(|_| None).unwrap_err(),
        DecodeError::MissingHeader(HEADER_ENCODING)
    );
    let bad_encoding = |n: &str| match n {
        HEADER_ENCODING => Some("gzip"),
        _ => Some("1"),
    };
    assert_eq!(
        FrameHeaders::parse(bad_encoding).unwrap_err(),
        DecodeError::UnknownEncoding("gzip".into())
    );
    let bad_count = |n: &str| match n {
        HEADER_ENCODING => Some("msgpack"),
        HEADER_EVENT_COUNT => Some("many"),
        _ => Some("1"),
    };
    assert!(matches!(
        FrameHeaders::parse(bad_count).unwrap_err(),
        DecodeError::InvalidHeader {
            name: HEADER_EVENT_COUNT,
            ..
        }
    ));
    let future_schema = |n: &str| match n {
        HEADER_ENCODING => Some("msgpack"),
        HEADER_SCHEMA => Some("9"),
        _ => Some("1"),
    };
    assert_eq!(
        FrameHeaders::parse(future_schema).unwrap_err(),
        DecodeError::UnsupportedFrameSchema(9)
    );
}

#[test]
fn a_wrong_event_count_is_refused() {
    let frame = encode_frame(config(), &all_records()).unwrap();
    let headers = FrameHeaders {
        event_count: frame.headers.event_count + 1,
        ..frame.headers
    };
    assert!(matches!(
        decode_frame(&config(), &headers, &frame.body).unwrap_err(),
        DecodeError::CountMismatch { .. }
    ));
}

#[test]
fn oversized_frames_are_refused_before_decoding() {
    let batch: Vec<_> = (0..50).map(|_| task_submitted_of_size(350)).collect();
    let frame = encode_frame(config(), &batch).unwrap();
    let tight = CodecConfig {
        max_frame_bytes: frame.body.len() - 1,
        ..config()
    };
    assert!(matches!(
        decode_frame(&tight, &frame.headers, &frame.body).unwrap_err(),
        DecodeError::FrameTooLarge { .. }
    ));
    // A small compressed body that inflates past the limit (a decompression bomb) is refused too.
    let bomb = CodecConfig {
        max_decoded_bytes: frame.raw_len - 1,
        ..config()
    };
    assert!(matches!(
        decode_frame(&bomb, &frame.headers, &frame.body).unwrap_err(),
        DecodeError::FrameTooLarge { .. }
    ));
    // And the encoder will not produce a frame the decoder would refuse.
    assert!(encode_frame(tight, &batch).is_err());
}

#[test]
fn bad_compression_is_a_typed_error() {
    let headers = FrameHeaders {
        encoding: Encoding::MsgPackZstd,
        event_count: 1,
        schema_version: 1,
    };
    assert!(matches!(
        decode_frame(&config(), &headers, b"definitely not zstd").unwrap_err(),
        DecodeError::BadCompression(_)
    ));
    // A valid zstd header followed by garbage.
    let batch: Vec<_> = (0..50).map(|_| task_submitted_of_size(350)).collect();
    let mut frame = encode_frame(config(), &batch).unwrap();
    let len = frame.body.len();
    frame.body.truncate(len / 2);
    let err = decode_frame(&config(), &frame.headers, &frame.body).unwrap_err();
    assert_eq!(err.kind(), "bad_compression", "{err}");
}

#[test]
fn unknown_type_and_unknown_version_are_typed_errors() {
    let record = &all_records()[0];
    let mut unknown_version = record.clone();
    unknown_version.envelope.schema_version = 99;
    let bytes = encode_event(&unknown_version).unwrap();
    match decode_event(&bytes).unwrap_err() {
        DecodeError::Payload {
            source:
                PayloadError::UnsupportedVersion {
                    kind,
                    version,
                    known,
                },
            ..
        } => {
            assert_eq!((kind.as_str(), version, known), ("TaskSubmitted", 99, 1));
        }
        other => panic!("unexpected {other:?}"),
    }

    // Rename the type inside the encoded element: same length, so the MessagePack stays well-formed.
    let mut bytes = encode_event(record).unwrap();
    let at = bytes
        .windows(13)
        .position(|w| w == b"TaskSubmitted")
        .unwrap();
    bytes[at..at + 13].copy_from_slice(b"TaskVaporised");
    match decode_event(&bytes).unwrap_err() {
        DecodeError::Payload {
            source: PayloadError::UnknownType { kind },
            ..
        } => {
            assert_eq!(kind, "TaskVaporised");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn invalid_field_values_are_refused_when_decoding() {
    // Priority 5 is encoded as the positive fixint 0x05 right after the "priority" key; make it 11.
    let record = &all_records()[0];
    let mut bytes = encode_event(record).unwrap();
    let at = bytes.windows(8).position(|w| w == b"priority").unwrap() + 8;
    assert_eq!(bytes[at], 5);
    bytes[at] = 11;
    match decode_event(&bytes).unwrap_err() {
        DecodeError::Payload {
            source: PayloadError::Invalid { kind, reason, .. },
            ..
        } => {
            assert_eq!(kind, "TaskSubmitted");
            assert!(reason.contains("priority 11"), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn envelopes_link_causes() {
    let cause = &all_records()[0];
    let producer = events::ProducerId::new("allocator-1").unwrap();
    let effect =
        events::EventRecord::caused_by(&cause.envelope, producer, all_records()[9].event.clone());
    assert_eq!(
        effect.envelope.correlation_id,
        cause.envelope.correlation_id
    );
    assert_eq!(effect.envelope.causation_id, Some(cause.envelope.event_id));
    assert_ne!(effect.envelope.event_id, cause.envelope.event_id);
    assert_eq!(effect.envelope.event_id.0.get_version_num(), 7);
}

#[test]
fn records_render_as_json_for_operators() {
    let json = serde_json::to_value(&all_records()[0]).unwrap();
    assert_eq!(json["type"], "TaskSubmitted");
    assert_eq!(json["data"]["spec"]["priority"], 5);
    assert_eq!(json["envelope"]["schema_version"], 1);
}

#[test]
fn sized_samples_encode_to_the_asked_size() {
    for size in [350, 400, 1000] {
        let len = encode_event(&task_submitted_of_size(size)).unwrap().len();
        assert_eq!(len, size, "asked for {size}");
    }
}
