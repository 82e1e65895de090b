//! Every pixie configuration under docs/examples parses and validates.

use std::path::Path;

#[test]
fn every_example_config_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !(name.starts_with("pixie") && name.ends_with(".toml")) {
            continue;
        }
        pixie::config::Config::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        n += 1;
    }
    assert!(n >= 2, "expected the pixie example configs in {}", dir.display());
}
