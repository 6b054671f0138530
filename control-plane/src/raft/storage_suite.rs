//! openraft's own storage conformance suite, run against the redb log store and the state
//! machine as a node opens them: log reads, appends, truncation and purge, vote, applied
//! state, membership, snapshots built, transferred and installed.

use openraft::StorageError;
use openraft::testing::{StoreBuilder, Suite};

use super::NodeId;
use super::TypeConfig;
use super::log_store::LogStore;
use super::state_machine::StateMachineStore;

/// A fresh log store and state machine in their own temporary directory.
struct Fresh;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Fresh {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = LogStore::open(&dir.path().join("raft-log.redb"), 0).expect("log store");
        let (machine, _shared) =
            StateMachineStore::open(&dir.path().join("snapshots")).expect("state machine");
        Ok((dir, log, machine))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Fresh).expect("openraft's storage suite");
}
