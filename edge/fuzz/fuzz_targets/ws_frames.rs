//! libFuzzer target `ws_frames`: the check of `channelgate_edge::fuzz::TARGETS`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| channelgate_edge::fuzz::run("ws_frames", data));
