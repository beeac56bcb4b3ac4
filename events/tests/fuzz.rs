//! Property tests: whatever bytes arrive, decoding returns (a typed error or events) and never panics.

use events::frame::decode_event;
use events::sample::all_records;
use events::{CodecConfig, Encoding, FrameHeaders, decode_frame, encode_frame};
use proptest::prelude::*;

fn headers(encoding: Encoding, event_count: u32) -> FrameHeaders {
    FrameHeaders {
        encoding,
        event_count,
        schema_version: 1,
    }
}

fn valid_frames() -> Vec<events::EncodedFrame> {
    let records = all_records();
    let small = CodecConfig {
        compress_threshold: usize::MAX,
        ..CodecConfig::default()
    };
    vec![
        encode_frame(CodecConfig::default(), &records).unwrap(),
        encode_frame(small, &records).unwrap(),
        encode_frame(small, &records[..1]).unwrap(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096), count in 0u32..100, zstd in any::<bool>()) {
        let encoding = if zstd { Encoding::MsgPackZstd } else { Encoding::MsgPack };
        let _ = decode_frame(&CodecConfig::default(), &headers(encoding, count), &bytes);
        let _ = decode_event(&bytes);
    }

    #[test]
    fn mutated_frames_never_panic(
        which in 0usize..3,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let frame = &valid_frames()[which];
        let mut body = frame.body.clone();
        for (index, value) in flips {
            let i = index.index(body.len());
            body[i] = value;
        }
        if truncate {
            body.truncate(cut.index(body.len()));
        }
        match decode_frame(&CodecConfig::default(), &frame.headers, &body) {
            Ok(events) => prop_assert_eq!(events.len() as u32, frame.headers.event_count),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}

#[test]
fn truncation_at_every_length_is_a_typed_error() {
    for frame in valid_frames() {
        for len in 0..frame.body.len() {
            assert!(
                decode_frame(&CodecConfig::default(), &frame.headers, &frame.body[..len]).is_err(),
                "a frame cut at {len} of {} bytes decoded",
                frame.body.len()
            );
        }
    }
}
