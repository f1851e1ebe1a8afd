//! The test-only panic trigger (feature `test-panic`) must never reach a
//! deployed binary: it is no default feature, and nothing that builds the
//! deployment (template.yaml's `rust-cargolambda` build, the Dockerfile)
//! enables it.

#![allow(clippy::unwrap_used)]

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[test]
fn the_panic_trigger_is_not_a_default_feature() {
    let manifest: String = read("Cargo.toml");
    let features = manifest
        .split("[features]")
        .nth(1)
        .expect("ws-message declares its features");
    assert!(
        !features
            .lines()
            .any(|line| line.trim_start().starts_with("default")),
        "ws-message must have no default features (test-panic would be in a deployed binary):\n{features}"
    );
}

#[test]
fn nothing_that_builds_the_deployment_enables_it() {
    for file in ["../../template.yaml", "../../Dockerfile"] {
        let text = read(file);
        assert!(
            !text.contains("test-panic"),
            "{file} must not enable the test-only feature test-panic"
        );
    }
}
