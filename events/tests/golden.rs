//! Golden fixtures: one encoded sample of every event type and version, checked in under `tests/fixtures`.
//!
//! Each `<Type>.v<N>.msgpack` must decode forever, to the value in `<Type>.v<N>.json` (upcast to the current
//! type when N is old). A new type or version needs its fixture: run with `COCOON_BLESS=1` once to write the
//! missing ones (existing fixtures are never rewritten), then commit them.

use std::path::{Path, PathBuf};

use events::frame::{decode_event, encode_event};
use events::sample::all_records;
use events::{EVENT_KINDS, EventRecord};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn json_of(record: &EventRecord) -> String {
    serde_json::to_string_pretty(record).unwrap() + "\n"
}

#[test]
fn every_current_type_and_version_has_a_fixture() {
    let bless = std::env::var_os("COCOON_BLESS").is_some();
    let mut missing = Vec::new();
    for record in all_records() {
        let stem = format!("{}.v{}", record.event.kind(), record.event.version());
        let bin = fixtures().join(format!("{stem}.msgpack"));
        if !bin.exists() {
            if bless {
                std::fs::create_dir_all(fixtures()).unwrap();
                std::fs::write(&bin, encode_event(&record).unwrap()).unwrap();
                std::fs::write(fixtures().join(format!("{stem}.json")), json_of(&record)).unwrap();
            } else {
                missing.push(stem);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "no golden fixture for {missing:?}; run with COCOON_BLESS=1 and commit"
    );
}

#[test]
fn every_fixture_still_decodes_to_its_recorded_value() {
    let mut checked = 0;
    for entry in std::fs::read_dir(fixtures()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("msgpack") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let record = decode_event(&bytes)
            .unwrap_or_else(|e| panic!("{} no longer decodes: {e}", path.display()));
        let expected = std::fs::read_to_string(path.with_extension("json")).unwrap();
        assert_eq!(
            json_of(&record),
            expected,
            "{} decodes to a different value",
            path.display()
        );
        checked += 1;
    }
    assert!(
        checked >= EVENT_KINDS.len(),
        "only {checked} fixtures found"
    );
}
