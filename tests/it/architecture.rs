//! The module structure, enforced: data flows one way (front ends -> operation layer ->
//! keystore -> hsm, with auth and audit beside), and nothing below the front ends speaks a
//! transport. A line of code (not a comment) that breaks a rule fails this test.

use std::path::{Path, PathBuf};

/// Files of a module: `src/NAME.rs` or everything under `src/NAME/`.
fn files(module: &str) -> Vec<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let file = src.join(format!("{module}.rs"));
    if file.exists() {
        return vec![file];
    }
    let mut found = Vec::new();
    let mut dirs = vec![src.join(module)];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                found.push(path);
            }
        }
    }
    found
}

/// Lines of code (comments left out) of `module` that contain any of `needles`.
fn offending(module: &str, needles: &[&str]) -> Vec<String> {
    let mut bad = Vec::new();
    for path in files(module) {
        let text = std::fs::read_to_string(&path).unwrap();
        for (number, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            if needles.iter().any(|n| code.contains(n)) {
                bad.push(format!("{}:{}: {}", path.display(), number + 1, code));
            }
        }
    }
    bad
}

/// Modules below the front ends: none imports tonic (the transport).
const TRANSPORT_FREE: &[&str] = &[
    "metrics",
    "ops",
    "auth",
    "audit",
    "keystore",
    "hsm",
    "error",
    "blob",
    "context",
    "ids",
    "grant",
    "config",
    "files",
    "hardening",
    "pki",
    "dev",
];

#[test]
fn no_module_below_the_front_ends_imports_tonic() {
    // The scanner itself works: it finds tonic where it belongs.
    assert!(!offending("front", &["use tonic"]).is_empty());
    for module in TRANSPORT_FREE {
        let bad = offending(module, &["tonic::", "use tonic"]);
        assert!(bad.is_empty(), "{module} speaks gRPC:\n{}", bad.join("\n"));
    }
}

#[test]
fn lower_layers_never_import_higher_ones() {
    let rules: &[(&str, &[&str])] = &[
        (
            "hsm",
            &[
                "crate::keystore",
                "crate::ops",
                "crate::front",
                "crate::server",
                "crate::auth",
            ],
        ),
        (
            "keystore",
            &["crate::ops", "crate::front", "crate::server", "crate::auth"],
        ),
        (
            "auth",
            &[
                "crate::ops",
                "crate::front",
                "crate::server",
                "crate::keystore",
            ],
        ),
        ("audit", &["crate::ops", "crate::front", "crate::server"]),
        // Recording is a leaf: what reads the keystore for a scrape lives with the server.
        (
            "metrics",
            &[
                "crate::keystore",
                "crate::hsm",
                "crate::audit",
                "crate::ops",
                "crate::auth",
                "crate::front",
                "crate::server",
            ],
        ),
        // Grants as data: a leaf the key store keeps and the gate consults.
        (
            "grant",
            &[
                "crate::ops",
                "crate::front",
                "crate::server",
                "crate::keystore",
                "crate::auth",
                "crate::hsm",
            ],
        ),
        ("ops", &["crate::front", "crate::server"]),
        ("front", &["crate::server"]),
        (
            "client",
            &[
                "crate::server",
                "crate::front",
                "crate::ops",
                "crate::keystore",
                "crate::hsm",
            ],
        ),
    ];
    for (module, forbidden) in rules {
        let bad = offending(module, forbidden);
        assert!(bad.is_empty(), "{module} reaches up:\n{}", bad.join("\n"));
    }
}
