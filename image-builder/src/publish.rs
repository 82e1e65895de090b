//! `image-builder publish`: registers a built image in the API's catalog with
//! `POST /v1/images` (`metal_types::Image`: the manifest plus the URL machines download from).

use std::path::Path;
use std::time::Duration;

use metal_types::{Image, ImageClassification};

use crate::archive;
use crate::error::{Error, Result};
use crate::http;

/// The catalog entry for a manifest: `url` is `url_base` + the image file name.
pub fn image_for(manifest_path: &Path, url_base: &str) -> Result<Image> {
    let manifest = archive::read_manifest(manifest_path)?;
    let file = format!("{}.{}", manifest.id(), manifest.format.extension());
    let url = format!("{}/{}", url_base.trim_end_matches('/'), file);
    Ok(Image { id: String::new(), url, classification: ImageClassification::Supported, expires_at: None, manifest })
}

/// POSTs the image to `<api>/v1/images`; returns the API's answer body.
pub fn publish(manifest_path: &Path, url_base: &str, api: &str, token: &str) -> Result<String> {
    let image = image_for(manifest_path, url_base)?;
    let body = serde_json::to_vec(&image).map_err(|e| Error::Invalid(e.to_string()))?;
    let url = format!("{}/v1/images", api.trim_end_matches('/'));
    let (status, answer) = http::post_json(&url, token, &body, Duration::from_secs(30))?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    if !(200..300).contains(&status) {
        return Err(Error::Http { url, message: format!("status {status}: {answer}") });
    }
    Ok(answer)
}
