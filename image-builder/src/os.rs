//! `image-builder os`: OS images (being written).

use std::path::PathBuf;

use crate::error::{Error, Result};

#[derive(Debug, Clone, clap::Args)]
pub struct OsArgs {
    #[arg(long, default_value = "bookworm")]
    pub suite: String,
    #[arg(long, default_value = "debian-12")]
    pub name: String,
    #[arg(long)]
    pub version: Option<String>,
    #[arg(long, default_value = "target/lab/images")]
    pub out: PathBuf,
}

pub fn build(_args: &OsArgs) -> Result<Vec<PathBuf>> {
    Err(Error::Invalid("`image-builder os` is not written yet".into()))
}
