//! What a node decodes from its peers and its own log: Raft requests and answers as they
//! arrive over the network (any format number), log entries and metadata as stored. Nothing
//! may panic, and what decodes encodes back to the same value.

#![no_main]

use cellplane_control_plane::raft::codec;
use cellplane_control_plane::raft::{NodeId, TypeConfig};
use cellplane_control_plane::state::command::{Applied, CommandBatch};
use libfuzzer_sys::fuzz_target;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Entry, LogId, StoredMembership, Vote};

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let format = u32::from(which >> 4);
    match which % 12 {
        0 => {
            let _ = codec::decode_versioned::<AppendEntriesRequest<TypeConfig>>(format, bytes);
        }
        1 => {
            let _ = codec::decode_versioned::<VoteRequest<NodeId>>(format, bytes);
        }
        2 => {
            let _ = codec::decode_versioned::<InstallSnapshotRequest<TypeConfig>>(format, bytes);
        }
        3 => {
            let _ = codec::decode_versioned::<AppendEntriesResponse<NodeId>>(format, bytes);
        }
        4 => {
            let _ = codec::decode_versioned::<VoteResponse<NodeId>>(format, bytes);
        }
        5 => {
            let _ = codec::decode_versioned::<InstallSnapshotResponse<NodeId>>(format, bytes);
        }
        6 => {
            if let Ok(entry) = codec::decode::<Entry<TypeConfig>>(bytes) {
                let again = codec::encode(&entry).expect("a decoded entry encodes");
                let back: Entry<TypeConfig> = codec::decode(&again).expect("and decodes back");
                assert_eq!(back.log_id, entry.log_id);
            }
        }
        7 => {
            if let Ok(batch) = codec::decode::<CommandBatch>(bytes) {
                let again = codec::encode(&batch).expect("a decoded batch encodes");
                assert_eq!(codec::decode::<CommandBatch>(&again).ok(), Some(batch));
            }
        }
        8 => {
            let _ = codec::decode::<Applied>(bytes);
        }
        9 => {
            let _ = codec::decode::<Vote<NodeId>>(bytes);
        }
        10 => {
            let _ = codec::decode::<LogId<NodeId>>(bytes);
        }
        _ => {
            let _ = codec::decode::<StoredMembership<NodeId, BasicNode>>(bytes);
        }
    }
});
