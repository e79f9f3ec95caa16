//! The README's first quick-start command, `protonode demo`, run as a user
//! would: it must tell the whole story and say it went as it should.

use std::process::{Command, Stdio};

use serde_json::Value;

#[test]
fn the_demo_tells_the_seed_story_to_its_end() {
    let out = Command::new(harness::protonode_bin())
        .args(["--json", "demo"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("running the demo");
    assert!(
        out.status.success(),
        "the demo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(summary["reused_ticket_refused"], true);
    assert_eq!(summary["meddler_caught"], true);
    let merged = summary["merged"].as_array().expect("the merge act");
    assert_eq!(merged.len(), 2, "Blair's and Charlie's views");
    for view in merged {
        let texts: Vec<&str> = view["history"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["text"].as_str())
            .collect();
        assert_eq!(
            texts,
            [
                "Just between us.",
                "Alex can't see this.",
                "Dani says hi too!",
                "Small world."
            ],
            "{}'s merged history, in order",
            view["person"]
        );
    }
}
