//! Fuzz target: `etcd_fanout::fuzzing::watch_session` (see `src/fuzzing/`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    etcd_fanout::fuzzing::watch_session(data);
});
