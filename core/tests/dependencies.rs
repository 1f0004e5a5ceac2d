// The architecture invariant "core performs no I/O", checked on the dependency graph.

use std::process::Command;

/// Crates that would mean runtime, network, HTTP, or database I/O in core.
const FORBIDDEN: &[&str] = &[
    "tokio",
    "async-std",
    "smol",
    "mio",
    "reqwest",
    "hyper",
    "h2",
    "http",
    "warp",
    "axum",
    "sled",
    "tokio-postgres",
    "postgres",
    "deadpool",
    "sqlx",
    "rusqlite",
    "redis",
    "socket2",
    "rustls",
    "native-tls",
    "openssl",
];

#[test]
fn core_normal_dependencies_include_no_runtime_http_or_database_crate() {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let out = Command::new(env!("CARGO"))
        .args(["tree", "--offline", "--manifest-path", manifest, "-p", "latchkey-core", "-e", "normal"])
        .args(["--prefix", "none", "--format", "{p}"])
        .output()
        .expect("cargo tree runs");
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8(out.stdout).expect("utf-8");
    let names: Vec<&str> = tree.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(names.contains(&"latchkey-core") && names.contains(&"aes-gcm"), "unexpected tree: {tree}");
    let found: Vec<&&str> = names.iter().filter(|n| FORBIDDEN.contains(n)).collect();
    assert!(found.is_empty(), "latchkey-core must not depend on {found:?}:\n{tree}");
}
