//! Host programs: finding them (with the Debian package to install when they are missing),
//! running them with useful errors, and copying a dynamically linked program into an image
//! together with the shared libraries and the loader it needs.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::error::{Error, Result};
use crate::tree::Tree;

/// Finds `tool` in `PATH` (plus the sbin directories, which root's PATH may lack).
pub fn find(tool: &str) -> Option<PathBuf> {
    if tool.contains('/') {
        let p = PathBuf::from(tool);
        return p.is_file().then_some(p);
    }
    let path = env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file());
    found
}

/// Like [`find`], but a missing tool is an error naming its Debian package.
pub fn require(tool: &str, package: &str) -> Result<PathBuf> {
    find(tool).ok_or_else(|| Error::MissingTool { tool: tool.to_string(), package: package.to_string() })
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command that writes under `dest`; if it fails because the disk is full, the error
/// is [`Error::NoSpace`] naming `dest`.
pub fn run_writing(cmd: &mut Command, dest: &Path) -> Result<Output> {
    run(cmd).map_err(|e| match e {
        Error::Command { stderr, .. } if stderr.contains("No space left on device") => {
            Error::NoSpace { path: dest.to_path_buf() }
        }
        other => other,
    })
}

/// Runs a command to completion; a non-zero exit is an error carrying the end of its stderr.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let command = describe(cmd);
    let out = cmd.output().map_err(|e| Error::Command {
        command: command.clone(),
        status: "not started".into(),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        let stderr = tail.join("\n");
        return Err(Error::Command { command, status: out.status.to_string(), stderr });
    }
    Ok(out)
}

/// The absolute paths `ldd` names for a program: its libraries and the dynamic loader.
/// Empty for a static program.
pub fn parse_ldd(text: &str) -> Vec<String> {
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(p.to_string());
        }
    }
    libs.sort();
    libs.dedup();
    libs
}

/// Shared libraries and loader of `program` (none when it is static).
pub fn shared_libs(program: &Path) -> Result<Vec<String>> {
    let ldd = require("ldd", "libc-bin")?;
    let out = Command::new(ldd).arg(program).output().map_err(|e| Error::io(program, e))?;
    // ldd exits 1 with "not a dynamic executable" for static programs.
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

/// Whether `program` is statically linked (has no ELF interpreter).
pub fn is_static(program: &Path) -> Result<bool> {
    Ok(shared_libs(program)?.is_empty())
}

/// Adds `host` at `dest` in the tree, plus every shared library it needs at the library's own
/// absolute path. Returns the libraries added.
pub fn add_program(tree: &mut Tree, dest: &str, host: &Path) -> Result<Vec<String>> {
    tree.host_file(dest, 0o755, host)?;
    let libs = shared_libs(host)?;
    for lib in &libs {
        if tree.get(lib.trim_start_matches('/')).is_none() {
            tree.host_file(lib, 0o755, Path::new(lib))?;
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
            \tlibext2fs.so.2 => /lib/x86_64-linux-gnu/libext2fs.so.2 (0x00007f)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            ["/lib/x86_64-linux-gnu/libc.so.6", "/lib/x86_64-linux-gnu/libext2fs.so.2", "/lib64/ld-linux-x86-64.so.2"]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n").is_empty());
        assert!(parse_ldd("\tstatically linked\n").is_empty());
    }

    #[test]
    fn missing_tool_names_the_package() {
        let err = require("surely-not-a-tool-xyz", "xyz-tools").unwrap_err();
        assert!(err.to_string().contains("apt-get install xyz-tools"), "{err}");
    }
}
