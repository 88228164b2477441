//! Fuzzing support for the parsers of what comes from outside (client messages, the handshake's
//! query, cookies and headers, connection ids, messages relayed over Redis, configuration):
//! property-based on the stable toolchain (`proptest`), with a checked-in seed corpus.
//!
//! Each parser's module has a `fuzz` test that (1) replays every file of
//! `edge/fuzz/corpus/<target>/` and (2) runs random and structured inputs; both go through the
//! same check, which asserts what must hold for any input (no panic, a clear refusal, round
//! trips where there is one). `cargo test` runs 256 random cases per target; `edge/fuzz/run`
//! runs many more. An input that ever failed is kept in its target's corpus.

use std::path::PathBuf;

use proptest::test_runner::{Config, FileFailurePersistence};

/// The seed corpus of `target`: every file in `edge/fuzz/corpus/<target>/`.
pub(crate) fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("the corpus {}: {err}", dir.display()))
        .map(|entry| {
            let path = entry.expect("a corpus entry").path();
            let bytes = std::fs::read(&path).expect("a readable corpus file");
            (path, bytes)
        })
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "the corpus {} is empty", dir.display());
    inputs
}

/// Runs `check` on every corpus input of `target`, naming the file that fails.
pub(crate) fn replay(target: &str, check: impl Fn(&[u8])) {
    for (path, input) in corpus(target) {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&input)));
        if let Err(panic) = result {
            eprintln!("corpus input {} failed", path.display());
            std::panic::resume_unwind(panic);
        }
    }
}

/// How many random cases a property runs: `PROPTEST_CASES`, else 256. Failures are not
/// written next to the sources: a failing input goes into the corpus by hand, with its fix.
pub(crate) fn config() -> Config {
    Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(256),
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..Config::default()
    }
}
