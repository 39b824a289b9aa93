//! The layer rules of ARCHITECTURE.md, checked on the sources: inside each crate no module
//! imports a module of a higher layer (so there is no import cycle), and only the QUIC shells
//! (`replica::server`, `agent::link`) use quinn.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The replica's layers, lowest first (ARCHITECTURE.md, "Layers").
const REPLICA: &[&[&str]] = &[
    &["error", "clock", "retention", "agent_ports"],
    &["datadir"],
    &["journal"],
    &["catalog"],
    &["target", "pause_board", "overlay"],
    &["reconstruct", "points"],
    &["lazy_image", "apply"],
    &["pins"],
    &[
        "restore", "diff", "status", "hashes", "trimmer", "export", "agents",
    ],
    &["failover", "metrics"],
    &["forget", "ingest", "verifier"],
    &["server", "console"],
    &["serve"],
];

/// The agent's layers, lowest first.
const AGENT: &[&[&str]] = &[
    &[
        "clock",
        "fsutil",
        "device",
        "range_lock",
        "batcher",
        "activity_log",
    ],
    &["dirty_map", "config", "state"],
    &["spool"],
    &["pipeline"],
    &["exports", "groups"],
    &["link"],
    &["maintenance", "status"],
    &["control", "metrics"],
    &["run"],
];

/// The modules each top-level module of `src` imports through `crate::` (comments and
/// `#[cfg(test)]` code left out), by module.
fn imports(src: &Path) -> BTreeMap<String, Vec<(String, PathBuf)>> {
    let mut out: BTreeMap<String, Vec<(String, PathBuf)>> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).expect("under src");
            let top = rel
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .expect("name")
                .trim_end_matches(".rs")
                .to_owned();
            if ["lib", "main", "cli"].contains(&top.as_str()) {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read source");
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            let deps = out.entry(top.clone()).or_default();
            for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
                let mut rest = line;
                while let Some(at) = rest.find("crate::") {
                    rest = &rest[at + "crate::".len()..];
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != top {
                        deps.push((name, path.clone()));
                    }
                }
            }
        }
    }
    out
}

fn check_layers(crate_dir: &str, layers: &[&[&str]]) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(crate_dir)
        .join("src");
    let layer_of = |m: &str| layers.iter().position(|l| l.contains(&m));
    let mut wrong = Vec::new();
    let graph = imports(&src);
    for (module, deps) in &graph {
        let Some(mine) = layer_of(module) else {
            wrong.push(format!(
                "{crate_dir}: module {module} is in no layer (add it to tests/layers.rs and ARCHITECTURE.md)"
            ));
            continue;
        };
        for (dep, path) in deps {
            match layer_of(dep) {
                // A crate-level item (`crate::now_ns`, a re-export of lib.rs).
                None if !graph.contains_key(dep) => {}
                None => wrong.push(format!("{crate_dir}: module {dep} is in no layer")),
                Some(theirs) if theirs > mine => wrong.push(format!(
                    "{}: {module} (layer {mine}) imports {dep} (layer {theirs})",
                    path.display()
                )),
                Some(theirs) if theirs == mine => wrong.push(format!(
                    "{}: {module} imports {dep} of its own layer {mine}: put one below the other",
                    path.display()
                )),
                Some(_) => {}
            }
        }
    }
    wrong.sort();
    wrong.dedup();
    assert!(
        wrong.is_empty(),
        "layer rules broken:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_replica_module_imports_a_higher_layer() {
    check_layers("replica", REPLICA);
}

#[test]
fn no_agent_module_imports_a_higher_layer() {
    check_layers("agent", AGENT);
}

#[test]
fn only_the_quic_shells_use_quinn() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let allowed = [
        root.join("replica/src/server.rs"),
        root.join("agent/src/link"),
        root.join("shared/src/identity.rs"),
    ];
    let mut stack = vec![
        root.join("replica/src"),
        root.join("agent/src"),
        root.join("shared/src"),
    ];
    let mut wrong = Vec::new();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs")
                && !allowed.iter().any(|a| path.starts_with(a))
                && std::fs::read_to_string(&path)
                    .expect("read source")
                    .lines()
                    .any(|l| !l.trim_start().starts_with("//") && l.contains("quinn::"))
            {
                wrong.push(path.display().to_string());
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "quinn used outside the QUIC shells: {wrong:?}"
    );
}
