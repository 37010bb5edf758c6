//! A small run of the consistency checker (`checker.rs`) in the test suite.

use std::time::Duration;

use crate::checker::{self, Settings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_and_writes_on_two_instances_stay_consistent() {
    let report = checker::run(Settings {
        clients: 8,
        duration: Duration::from_secs(3),
        users: 10,
        products: 12,
        max_delay: Duration::from_millis(5),
    })
    .await;
    assert!(report.writes > 50 && report.reads > 100, "the run did work: {report:?}");
    assert_eq!(
        report.stale_entries,
        Vec::<String>::new(),
        "stale entries after quiescing"
    );
    assert_eq!(
        report.read_violations,
        Vec::<String>::new(),
        "reads older than an acknowledged write"
    );
}
