#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_distributor::fuzzing::push_json(data));
