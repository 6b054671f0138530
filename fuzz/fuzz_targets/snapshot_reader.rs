//! A snapshot file as a node reads it at start or after a leader sent it: any bytes either load
//! into a state or are refused as corrupt; nothing panics, and no length in the file makes
//! the reader allocate more than the file holds.

#![no_main]

use cellplane_control_plane::raft::snapshot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The magic, so most inputs reach the frames.
    let mut file = b"CPSNAP02".to_vec();
    file.extend_from_slice(data);
    let _ = snapshot::read(data);
    let _ = snapshot::read(file.as_slice());
});
