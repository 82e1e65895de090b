//! `image-builder publish`: registers a built image in the API's catalog with
//! `POST /v1/images` (`metal_types::Image`: the manifest plus the URL machines download from),
//! through the typed client `metal_client::api` (HTTP or HTTPS, trusting `ca_file` when given).

use std::path::Path;

use metal_types::{Image, ImageClassification};

use crate::archive;
use crate::error::{Error, Result};

/// The catalog entry for a manifest: `url` is `url_base` + the image file name.
pub fn image_for(manifest_path: &Path, url_base: &str) -> Result<Image> {
    let manifest = archive::read_manifest(manifest_path)?;
    let file = format!("{}.{}", manifest.id(), manifest.format.extension());
    let url = format!("{}/{}", url_base.trim_end_matches('/'), file);
    Ok(Image { id: String::new(), url, classification: ImageClassification::Supported, expires_at: None, manifest })
}

/// POSTs the image to `<api>/v1/images`; returns the image as the API stored it (JSON). An
/// `https://` API must chain to `ca_file` when given, else to the system's trust store.
pub fn publish(manifest_path: &Path, url_base: &str, api: &str, token: &str, ca_file: Option<&Path>) -> Result<String> {
    let image = image_for(manifest_path, url_base)?;
    let url = format!("{}/v1/images", api.trim_end_matches('/'));
    let failed = |e: metal_client::api::ClientError| Error::Http {
        url: url.clone(),
        message: match e.status() {
            Some(status) => format!("status {}: {e}", status.as_u16()),
            None => format!("{e}"),
        },
    };
    let client =
        metal_client::api::Client::new_as(concat!("image-builder/", env!("CARGO_PKG_VERSION")), api, Some(token.into()), ca_file)
            .map_err(failed)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start the async runtime: {e}")))?;
    let (stored, _created) = runtime.block_on(client.create(&image)).map_err(failed)?;
    serde_json::to_string(&stored).map_err(|e| Error::Invalid(e.to_string()))
}
