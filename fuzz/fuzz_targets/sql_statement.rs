#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_sql::fuzzing::sql_statement(data));
