//! libFuzzer target `relayed_presence`: the check of `channelgate_edge::fuzz::TARGETS`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| channelgate_edge::fuzz::run("relayed_presence", data));
