#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_distributor::fuzzing::pprof_profile(data));
