//! `cellplane dev --demo`, the showcase the README points to: it moves a tenant and then one of
//! its groups while writers send, and must report every send acknowledged; the system it leaves
//! running then stops cleanly on SIGTERM.

use std::process::Command;
use std::time::{Duration, Instant};

use cellplane_tests::{binary, stop_dev};

#[test]
fn the_dev_demo_moves_a_tenant_and_a_group_without_a_failed_send() {
    let dir = tempfile::Builder::new()
        .prefix("cellplane-demo-")
        .tempdir()
        .expect("temp dir");
    let data = dir.path().join("data");
    let out_path = dir.path().join("demo.out");
    let out = std::fs::File::create(&out_path).expect("output file");
    let log = std::fs::File::create(dir.path().join("demo.log")).expect("log file");
    let mut demo = Command::new(binary("cellplane"))
        .arg("dev")
        .arg("--demo")
        .arg("--data-dir")
        .arg(&data)
        .stdout(out)
        .stderr(log)
        .spawn()
        .expect("start cellplane dev --demo");
    let deadline = Instant::now() + Duration::from_secs(180);
    let printed = loop {
        let printed = std::fs::read_to_string(&out_path).expect("read output");
        if printed.contains("messages acknowledged") {
            break printed;
        }
        if let Some(status) = demo.try_wait().expect("demo status") {
            panic!(
                "the demo ended ({status}):\n{printed}\nlog in {}",
                dir.path().display()
            );
        }
        if Instant::now() > deadline {
            let _ = demo.kill();
            panic!("the demo did not finish:\n{printed}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let summary = printed
        .lines()
        .find(|line| line.contains("messages acknowledged"))
        .expect("a summary line");
    assert!(summary.contains(", 0 failed;"), "{summary}");
    assert_eq!(
        printed.matches(" DONE ").count(),
        2,
        "both migrations finish:\n{printed}"
    );

    stop_dev(&mut demo, &data);
}
