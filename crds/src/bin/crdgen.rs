//! Writes every CRD to `crds/yaml/` (or the directory given), as the types generate it.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("yaml"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir)?;
    for (file, crd) in cellplane_crds::crds() {
        std::fs::write(dir.join(file), cellplane_crds::to_yaml(&crd)?)?;
        println!("{}", dir.join(file).display());
    }
    Ok(())
}
