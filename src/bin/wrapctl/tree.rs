//! The files under the paths a command names: files as named, directories walked
//! recursively. A path named on the command line is followed if it is a symbolic link (as
//! `find -H` does); links found inside directories are not (a link cycle would never end,
//! and a file reached twice would be counted twice). The temporary files wrapctl stages its
//! outputs in (hidden, `.…wrapctl-…`) are not listed.

use std::path::{Path, PathBuf};

/// A file to work on, or a path that could not be read.
pub enum Entry {
    /// A regular file; `named` when the command line named it (not found by a walk).
    File { path: PathBuf, named: bool },
    /// A path or directory that could not be read, and why.
    Unreadable { path: PathBuf, reason: String },
}

/// Every file under `paths`, in a stable order (each directory's entries sorted by name).
pub fn files(paths: &[PathBuf]) -> Vec<Entry> {
    let mut out = Vec::new();
    for path in paths {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => walk(path, &mut out),
            Ok(meta) if meta.is_file() => out.push(Entry::File {
                path: path.clone(),
                named: true,
            }),
            Ok(_) => out.push(Entry::Unreadable {
                path: path.clone(),
                reason: "not a regular file or directory".into(),
            }),
            Err(e) => out.push(Entry::Unreadable {
                path: path.clone(),
                reason: e.to_string(),
            }),
        }
    }
    out
}

fn walk(dir: &Path, out: &mut Vec<Entry>) {
    let listed = std::fs::read_dir(dir).and_then(|entries| {
        let mut entries = entries.collect::<std::io::Result<Vec<_>>>()?;
        entries.sort_by_key(|e| e.file_name());
        Ok(entries)
    });
    let entries = match listed {
        Ok(entries) => entries,
        Err(e) => {
            return out.push(Entry::Unreadable {
                path: dir.to_owned(),
                reason: e.to_string(),
            });
        }
    };
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.contains(".wrapctl-") || name.starts_with(".wrapctl-") {
            continue; // an output being staged (or left by a killed run)
        }
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => walk(&path, out),
            Ok(kind) if kind.is_file() => out.push(Entry::File { path, named: false }),
            // Said, not skipped silently: what it points at is not looked at.
            Ok(kind) if kind.is_symlink() => out.push(Entry::Unreadable {
                path,
                reason: "a symbolic link inside a directory (not followed; name its target)".into(),
            }),
            Ok(_) => {}
            Err(e) => out.push(Entry::Unreadable {
                path,
                reason: e.to_string(),
            }),
        }
    }
}
