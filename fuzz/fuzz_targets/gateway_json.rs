//! Fuzz target: `etcd_fanout::fuzzing::gateway_json` (see `src/fuzzing/`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    etcd_fanout::fuzzing::gateway_json(data);
});
