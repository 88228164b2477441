//! Fuzzing of the parsers of what comes from outside (client messages, the handshake's query
//! and `recover`, cookies and headers, connection ids, PROXY headers and forwarding headers,
//! messages relayed over Redis, Redis read answers, configuration), in two ways that share one
//! check per target and one seed corpus (`edge/fuzz/corpus/<target>/`):
//!
//! * property-based on the stable toolchain (`proptest`): each parser's module has a `fuzz`
//!   test that replays its target's corpus and runs random and structured inputs. `cargo test`
//!   runs 256 random cases per target; `edge/fuzz/run` runs many more.
//! * coverage-guided (libFuzzer through `cargo fuzz`, the crate in `edge/fuzz/`): each target
//!   of [`TARGETS`] is a `fuzz_target!` calling its check; `edge/fuzz/libfuzzer SECONDS` runs
//!   each in turn, seeded with the same corpus. This module is compiled for it with
//!   `--cfg fuzzing` (which `cargo fuzz` sets), and is not part of the crate otherwise.
//!
//! Each check asserts what must hold for any input (no panic, a clear refusal, round trips
//! where there is one). An input that ever failed is kept in its target's corpus.

/// A target's check: panics when what must hold for any input does not.
pub type Check = fn(&[u8]);

/// Every fuzz target: its corpus name and its check.
pub const TARGETS: &[(&str, Check)] = &[
    ("client_message", crate::protocol::check_client_message),
    ("recover", crate::protocol::check_recover),
    ("handshake_query", crate::handshake::check_query),
    ("headers", crate::handshake::check_headers),
    ("connection_id", crate::credentials::check_connection_id),
    ("proxy_header", crate::proxy::check_proxy_header),
    ("relayed_push", crate::bus::redis::check_relayed_push),
    ("node_command", crate::bus::redis::check_node_command),
    (
        "relayed_presence",
        crate::bus::redis::check_relayed_presence,
    ),
    ("redis_read", crate::bus::redis::check_redis_read),
    ("config", crate::config::check_config),
    ("ws_frames", crate::ws::check_frames),
    ("fossil_apply", crate::fossil::check_apply),
];

/// Runs the check of `target` on `input` (a `cargo fuzz` target's body).
pub fn run(target: &str, input: &[u8]) {
    match TARGETS.iter().find(|(name, _)| *name == target) {
        Some((_, check)) => check(input),
        None => panic!("no fuzz target {target:?}"),
    }
}

#[cfg(test)]
use std::path::PathBuf;

#[cfg(test)]
use proptest::test_runner::{Config, FileFailurePersistence};

/// The seed corpus of `target`: every file in `edge/fuzz/corpus/<target>/`.
#[cfg(test)]
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
#[cfg(test)]
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
#[cfg(test)]
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

#[cfg(test)]
mod tests {
    /// Every target has a corpus, and every corpus a target.
    #[test]
    fn every_target_has_a_corpus_and_every_corpus_a_target() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        let mut corpora: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        corpora.sort();
        let mut targets: Vec<String> = super::TARGETS.iter().map(|(n, _)| n.to_string()).collect();
        targets.sort();
        assert_eq!(corpora, targets);
        for target in &targets {
            let fuzz_target = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/fuzz_targets")
                .join(format!("{target}.rs"));
            assert!(fuzz_target.exists(), "{} is missing", fuzz_target.display());
            for (_, input) in super::corpus(target) {
                super::run(target, &input);
            }
        }
    }
}
