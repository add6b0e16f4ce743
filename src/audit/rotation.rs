//! Rotated file names (shared with `verify` and recovery) and retention:
//! `audit.keep_files` deletes the oldest rotated files beyond that number.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

/// The name a full active file is renamed to: the last `seq` it holds, zero-padded
/// to 20 digits, before the extension: `taskgate-audit.jsonl` holding records up
/// to seq 4711 becomes `taskgate-audit.00000000000000004711.jsonl` (a name
/// without an extension gets `.<20 digits>` appended). Name order is
/// chronological order, and the active file sorts after its rotated files.
pub fn rotated_path(active: &Path, last_seq: u64) -> PathBuf {
    let digits = format!("{last_seq:020}");
    let mut name = OsString::new();
    match (active.file_stem(), active.extension()) {
        (Some(stem), Some(ext)) => {
            name.push(stem);
            name.push(".");
            name.push(&digits);
            name.push(".");
            name.push(ext);
        }
        _ => {
            name.push(active.file_name().unwrap_or_default());
            name.push(".");
            name.push(&digits);
        }
    }
    active.with_file_name(name)
}

/// The `seq` in `name` if it is a rotated name of `active`.
pub(super) fn rotated_seq(active: &Path, name: &std::ffi::OsStr) -> Option<u64> {
    let (prefix, suffix) = match (active.file_stem(), active.extension()) {
        (Some(stem), Some(ext)) => (
            [stem.as_encoded_bytes(), b"."].concat(),
            [b".", ext.as_encoded_bytes()].concat(),
        ),
        _ => (
            [active.file_name()?.as_encoded_bytes(), b"."].concat(),
            Vec::new(),
        ),
    };
    let digits = name
        .as_encoded_bytes()
        .strip_prefix(prefix.as_slice())?
        .strip_suffix(suffix.as_slice())?;
    if digits.len() != 20 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The rotated files of `active`, oldest first.
pub(super) fn rotated_files(active: &Path) -> io::Result<Vec<PathBuf>> {
    let dir = super::recover::parent_dir(active);
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(seq) = rotated_seq(active, &entry.file_name()) {
            found.push((seq, dir.join(entry.file_name())));
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, path)| path).collect())
}

/// Every file of the log at `active`, in chain order: its rotated files oldest
/// first, then `active` itself if it exists. What `verify` wants when given
/// only the configured path.
pub fn audit_files(active: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = rotated_files(active)?;
    if fs::symlink_metadata(active).is_ok() {
        files.push(active.to_path_buf());
    }
    Ok(files)
}

/// Deletes the oldest rotated files of `active` beyond `keep` (0: keep all),
/// logging each; the active file is never touched. Returns how many went.
pub(super) fn enforce_retention(active: &Path, keep: usize) -> usize {
    if keep == 0 {
        return 0;
    }
    let files = match rotated_files(active) {
        Ok(f) => f,
        Err(e) => {
            warn!(file = %active.display(), cause = %e, "cannot list rotated audit files for retention");
            return 0;
        }
    };
    let excess = files.len().saturating_sub(keep);
    let mut removed = 0;
    for old in &files[..excess] {
        match fs::remove_file(old) {
            Ok(()) => {
                info!(file = %old.display(), keep_files = keep, "deleted the oldest rotated audit file (audit.keep_files)");
                removed += 1;
            }
            Err(e) => {
                warn!(file = %old.display(), cause = %e, "cannot delete a rotated audit file")
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_names_sort_chronologically_and_parse_back() {
        let active = Path::new("/var/log/taskgate-audit.jsonl");
        let a = rotated_path(active, 9);
        let b = rotated_path(active, 10);
        assert_eq!(
            a,
            Path::new("/var/log/taskgate-audit.00000000000000000009.jsonl")
        );
        assert!(a.file_name() < b.file_name());
        assert!(b.file_name().unwrap() < active.file_name().unwrap());
        assert_eq!(rotated_seq(active, b.file_name().unwrap()), Some(10));
        assert_eq!(rotated_seq(active, active.file_name().unwrap()), None);
        assert_eq!(
            rotated_seq(active, "taskgate-audit.123.jsonl".as_ref()),
            None
        );

        let bare = Path::new("audit");
        assert_eq!(
            rotated_path(bare, u64::MAX),
            Path::new("audit.18446744073709551615")
        );
        assert_eq!(
            rotated_seq(bare, "audit.00000000000000000042".as_ref()),
            Some(42)
        );
        assert_eq!(
            rotated_seq(bare, "audit.99999999999999999999".as_ref()),
            None
        );
    }
}
