//! The one error type of the image builder. Each variant carries what the operator needs to fix
//! the problem: the Debian package of a missing tool, the command that fetches a missing kernel,
//! the path of a full disk.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`{tool}` not found in PATH: install the Debian package `{package}` (apt-get install {package})")]
    MissingTool { tool: String, package: String },

    #[error(
        "no extracted kernel at {dir} ({what}): run `image-builder kernel --cache /var/cache/metal` \
         first; it downloads Debian's linux-image-amd64 and extracts it with modules.dep and \
         modules.alias into /var/cache/metal/kernel/<version>/"
    )]
    MissingKernel { dir: PathBuf, what: String },

    #[error("no space left on the device holding {path}: free some space or write somewhere else")]
    NoSpace { path: PathBuf },

    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("`{command}` failed ({status}): {stderr}")]
    Command { command: String, status: String, stderr: String },

    #[error("kernel module `{module}` is neither in {dep_file} nor built into the kernel")]
    MissingModule { module: String, dep_file: PathBuf },

    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },

    #[error("{0}")]
    Invalid(String),

    #[error("HTTP {url}: {message}")]
    Http { url: String, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it happened on; a full disk becomes [`Error::NoSpace`].
    pub fn io(path: impl AsRef<Path>, source: io::Error) -> Error {
        let path = path.as_ref().to_path_buf();
        if source.kind() == io::ErrorKind::StorageFull || source.raw_os_error() == Some(28) {
            Error::NoSpace { path }
        } else {
            Error::Io { path, source }
        }
    }
}

/// `map_err(at(path))`: attach a path to an I/O error.
pub fn at(path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> Error {
    move |e| Error::io(path, e)
}
