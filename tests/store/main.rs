//! Route stores: the conformance suite run against the embedded Raft store and against a real
//! etcd, and etcd's own failure test.

mod etcd_failure;
mod etcd_tls;
mod harness;
mod limits;
mod suite;

/// Runs every test of the suite against one backend.
macro_rules! conformance {
    ($module:ident, $backend:ty, [$($test:ident),* $(,)?]) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    crate::suite::$test::<$backend>().await;
                }
            )*
        }
    };
}

conformance!(
    raft,
    crate::harness::Raft,
    [
        crud,
        cas_races,
        watch_order_and_resume,
        compaction,
        pagination,
        bad_input,
        migration_records,
        restart,
        failover,
        region_failover,
        audit
    ]
);
conformance!(
    etcd,
    crate::harness::Etcd,
    [
        crud,
        cas_races,
        watch_order_and_resume,
        compaction,
        pagination,
        bad_input,
        migration_records,
        restart,
        failover,
        region_failover,
        audit
    ]
);
