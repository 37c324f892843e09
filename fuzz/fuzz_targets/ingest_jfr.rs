#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_ingest::fuzzing::ingest_jfr(data));
