//! Start-up (and re-open) recovery: open and lock the active file, find the
//! chain head among the files beside it, skip a torn tail. Blocking file work:
//! it runs at start-up or on the sync thread, never on a tokio worker.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::FsyncPolicy;
use super::record::{HexHash, Parsed, parse_line};

/// Chunk size of the backwards scan for the last record.
const SCAN_CHUNK: usize = 64 * 1024;
/// A line longer than this is never a record (request bodies are limited to a
/// few KiB to MiB): skipped as torn without reading it into memory.
const MAX_LINE: u64 = 64 << 20;

/// Opens the active file for reading (the tail scan) and appending, and takes
/// an advisory lock so a second process cannot interleave its own chain.
/// Returns whether the file was created.
pub(super) fn open_active(path: &Path) -> io::Result<(File, bool)> {
    let existed = fs::symlink_metadata(path).is_ok();
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "locked by another process (two gateways on one audit file?)",
            ));
        }
        // Filesystems without locks: carry on unlocked.
        Err(TryLockError::Error(e)) => {
            tracing::debug!(file = %path.display(), cause = %e, "audit file lock unavailable");
        }
    }
    Ok((file, !existed))
}

pub(super) fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(parent_dir(path))?.sync_all()
}

pub(super) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The newest record found on disk, where the chain continues.
pub(super) struct LastRecord {
    pub file: PathBuf,
    pub seq: u64,
    pub hash: HexHash,
    pub hash_ok: bool,
}

/// The active file, opened, and where the chain stands.
pub(super) struct Resumed {
    pub file: File,
    pub len: u64,
    /// The file ends in a torn line without `\n`: the next write starts with one.
    pub need_newline: bool,
    /// The file holds at least one record.
    pub has_records: bool,
    /// The newest complete record in `audit.path`'s directory: the active
    /// file, its rotated files and files renamed beside it.
    pub last: Option<LastRecord>,
    /// Byte offsets of the torn lines after the last record of the active file.
    pub torn: Vec<u64>,
}

/// Opens the active file and finds where the chain stands: the record with
/// the highest `seq` among the active file and every file beside it whose
/// name starts with the active file's stem (`taskgate-audit.jsonl.1`,
/// `taskgate-audit.00000000000000004711.jsonl`, `taskgate-audit.jsonl-20261202`
/// ...), so an operator's `mv` or a logrotate without copytruncate does not
/// start a new chain. Blocking: runs on the sync thread or at start-up.
pub(super) fn resume(path: &Path, policy: FsyncPolicy) -> io::Result<Resumed> {
    let (mut file, created) = open_active(path)?;
    if created && policy != FsyncPolicy::Never {
        sync_dir(path)?;
    }
    let len = file.metadata()?.len();
    let need_newline = len > 0 && read_byte(&file, len - 1)? != b'\n';
    let tail = scan_tail(&mut file, len)?;
    let has_records = tail.last.is_some();
    let mut last = tail.last.map(|info| LastRecord {
        file: path.to_path_buf(),
        seq: info.seq,
        hash: info.hash,
        hash_ok: info.hash_ok,
    });
    for other in files_beside(path)? {
        let Ok(mut f) = File::open(&other) else {
            continue;
        };
        let Ok(meta) = f.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        if let Ok(scan) = scan_tail(&mut f, meta.len())
            && let Some(info) = scan.last
            && last.as_ref().is_none_or(|l| info.seq > l.seq)
        {
            last = Some(LastRecord {
                file: other,
                seq: info.seq,
                hash: info.hash,
                hash_ok: info.hash_ok,
            });
        }
    }
    Ok(Resumed {
        file,
        len,
        need_newline,
        has_records,
        last,
        torn: tail.torn,
    })
}

/// Files in the active file's directory whose name starts with its stem,
/// the active file itself excepted.
fn files_beside(active: &Path) -> io::Result<Vec<PathBuf>> {
    let Some(name) = active.file_name() else {
        return Ok(Vec::new());
    };
    let stem = active.file_stem().unwrap_or(name).as_encoded_bytes();
    let dir = parent_dir(active);
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let entry_name = entry.file_name();
        if entry_name != name && entry_name.as_encoded_bytes().starts_with(stem) {
            found.push(dir.join(entry_name));
        }
    }
    found.sort();
    Ok(found)
}

pub(super) struct TailScan {
    pub last: Option<super::record::LineInfo>,
    pub torn: Vec<u64>,
}

/// Walks the file's lines backwards from the end to the last complete record,
/// collecting the offsets of the unreadable lines after it. Reads in chunks, so
/// memory stays bounded whatever the file holds.
pub(super) fn scan_tail(file: &mut File, len: u64) -> io::Result<TailScan> {
    let mut scan = TailScan {
        last: None,
        torn: Vec::new(),
    };
    if len == 0 {
        return Ok(scan);
    }
    let mut chunk = vec![0u8; SCAN_CHUNK];
    let mut line_end = if read_byte(file, len - 1)? == b'\n' {
        len - 1
    } else {
        len
    };
    let mut line = Vec::new();
    loop {
        let line_start = match prev_newline(file, line_end, &mut chunk)? {
            Some(nl) => nl + 1,
            None => 0,
        };
        let line_len = line_end - line_start;
        if line_len <= MAX_LINE {
            line.resize(line_len as usize, 0);
            file.seek(SeekFrom::Start(line_start))?;
            file.read_exact(&mut line)?;
            if let Parsed::Record(info) = parse_line(&line) {
                scan.last = Some(info);
                return Ok(scan);
            }
        }
        scan.torn.push(line_start);
        if line_start == 0 {
            return Ok(scan);
        }
        line_end = line_start - 1;
    }
}

/// Offset of the last `\n` before `before`, if any.
fn prev_newline(file: &mut File, before: u64, chunk: &mut [u8]) -> io::Result<Option<u64>> {
    let mut end = before;
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let n = (end - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk[..n])?;
        if let Some(i) = chunk[..n].iter().rposition(|&b| b == b'\n') {
            return Ok(Some(start + i as u64));
        }
        end = start;
    }
    Ok(None)
}

pub(super) fn read_byte(file: &File, at: u64) -> io::Result<u8> {
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, at)?;
    Ok(b[0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{GENESIS, Record, encode_line};

    #[test]
    fn tail_scan_skips_torn_lines_back_to_the_last_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let mut bytes = Vec::new();
        let mut prev = GENESIS;
        for seq in 1..=3 {
            prev = encode_line(
                &mut bytes,
                seq,
                "2026-01-01T00:00:00.000Z",
                &Record::attempt("r"),
                &prev,
            )
            .unwrap();
        }
        bytes.extend_from_slice(b"{\"seq\":4,\"ts\"\n");
        let second_torn = bytes.len() as u64;
        bytes.extend_from_slice(&vec![0u8; 200_000]);
        fs::write(&path, &bytes).unwrap();

        let mut f = File::open(&path).unwrap();
        let scan = scan_tail(&mut f, bytes.len() as u64).unwrap();
        let last = scan.last.unwrap();
        assert_eq!((last.seq, last.hash), (3, prev));
        assert_eq!(scan.torn.len(), 2);
        assert_eq!(scan.torn[0], second_torn);
    }
}
