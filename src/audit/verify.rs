//! `verify`: reads audit files in the order given and checks every record's hash,
//! the `prev` links and the `seq` numbering across them, naming the first bad
//! record (behind `taskgate audit verify FILE...`).

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::record::{GENESIS, HexHash, Parsed, hex_str, parse_line};

/// A line in one of the files given (line numbers start at 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: u64,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// What a successful `verify` saw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VerifyReport {
    /// Records whose hash, `prev` and `seq` checked out.
    pub records: u64,
    /// Unreadable lines skipped because the chain continues past them (torn writes).
    pub torn: u64,
    pub torn_lines: Vec<Location>,
    /// `seq` of the first record: 1 when the files start at the beginning of the
    /// log; larger when they are a tail (its `prev` is then taken on trust).
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// `hash` of the last record: keep it somewhere else to detect a later
    /// truncation or rewrite of the tail.
    pub last_hash: Option<String>,
}

/// What is wrong with the first bad record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The final line is not a complete record, yet it ends with a newline, which
    /// a torn write never does (the writer only adds a newline after a torn line
    /// when it appends the next record).
    NotJson(String),
    /// The record's contents do not match its `hash`: the line was edited.
    BadHash,
    /// `prev` is not the previous record's `hash`: a record was deleted, reordered
    /// or inserted before this one (or the line before it was edited into an
    /// unreadable one, see `after_unreadable`).
    PrevMismatch {
        expected: String,
        found: String,
        /// The unreadable line skipped just before this record, if any.
        after_unreadable: Option<u64>,
    },
    /// `seq` is not the previous record's plus one.
    SeqGap { expected: u64, found: u64 },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NotJson(why) => write!(f, "not a complete JSON record ({why})"),
            Problem::BadHash => f.write_str("bad hash: the record does not match its hash"),
            Problem::PrevMismatch {
                expected,
                found,
                after_unreadable,
            } => {
                write!(
                    f,
                    "prev mismatch: expected {expected}, found {found} \
                     (a record before it was deleted, reordered or altered)"
                )?;
                if let Some(line) = after_unreadable {
                    write!(f, "; line {line} before it is unreadable")?;
                }
                Ok(())
            }
            Problem::SeqGap { expected, found } => {
                write!(f, "seq gap: expected {expected}, found {found}")
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{}: {source}", file.display())]
    Io {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The first record that does not check out.
    #[error("{at}: {}{problem}", seq.map(|s| format!("seq {s}: ")).unwrap_or_default())]
    Broken {
        at: Location,
        /// The record's `seq`, when the line could be read.
        seq: Option<u64>,
        problem: Problem,
    },
}

/// Checks the chain across `paths`, in the order given (oldest first: the
/// rotated files in name order, then the active file; see [`super::audit_files`]).
///
/// * Every line must be a record whose `hash` matches its contents, whose `prev`
///   is the previous record's `hash` and whose `seq` is the previous one's plus 1.
/// * The first record is the anchor: if its `seq` is 1 its `prev` must be
///   [`super::GENESIS_PREV`]; otherwise its `prev` is accepted as it is, so a tail
///   of the log (old rotated files archived away) can be verified on its own.
///   [`VerifyReport::first_seq`] says where the verified range starts.
/// * An unreadable line (a torn write left by a crash) is counted in
///   [`VerifyReport::torn`] and skipped: the next record must link to the record
///   before it, so a record edited into garbage still fails as a `prev` mismatch
///   on the following line. The final line may be torn only if it has no
///   trailing newline.
/// * Undetectable by design without an outside anchor: removing records from the
///   end, or rewriting the whole chain from some point on. Compare
///   [`VerifyReport::last_hash`] with a copy kept elsewhere for that.
pub fn verify(paths: &[PathBuf]) -> Result<VerifyReport, VerifyError> {
    let mut report = VerifyReport::default();
    // (next seq, prev) expected of the next record; None before the first one.
    let mut expected: Option<(u64, HexHash)> = None;
    // The last unreadable line since the last record, and whether it ended in '\n'.
    let mut unreadable: Option<(Location, String, bool)> = None;
    let mut line = Vec::with_capacity(4096);

    for path in paths {
        let io_err = |source| VerifyError::Io {
            file: path.clone(),
            source,
        };
        let mut reader = BufReader::with_capacity(256 * 1024, File::open(path).map_err(io_err)?);
        let mut line_no = 0u64;
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line).map_err(io_err)? == 0 {
                break;
            }
            line_no += 1;
            let terminated = line.last() == Some(&b'\n');
            let content = if terminated {
                &line[..line.len() - 1]
            } else {
                &line[..]
            };
            let info = match parse_line(content) {
                Parsed::Record(info) => info,
                Parsed::Unreadable(why) => {
                    let at = at(path, line_no);
                    report.torn += 1;
                    report.torn_lines.push(at.clone());
                    unreadable = Some((at, why, terminated));
                    continue;
                }
            };
            let broken = |seq, problem| VerifyError::Broken {
                at: at(path, line_no),
                seq,
                problem,
            };
            if !info.hash_ok {
                return Err(broken(Some(info.seq), Problem::BadHash));
            }
            let (want_seq, want_prev) = match expected {
                Some(next) => next,
                // The anchor: genesis for seq 1, its own prev for a tail.
                None if info.seq == 1 => (1, GENESIS),
                None => (info.seq, info.prev),
            };
            if info.prev != want_prev {
                let after_unreadable = unreadable
                    .as_ref()
                    .filter(|(u, _, _)| u.file == *path)
                    .map(|(u, _, _)| u.line);
                return Err(broken(
                    Some(info.seq),
                    Problem::PrevMismatch {
                        expected: hex_str(&want_prev).to_owned(),
                        found: hex_str(&info.prev).to_owned(),
                        after_unreadable,
                    },
                ));
            }
            if info.seq != want_seq || info.seq == 0 {
                return Err(broken(
                    Some(info.seq),
                    Problem::SeqGap {
                        expected: want_seq.max(1),
                        found: info.seq,
                    },
                ));
            }
            expected = Some((info.seq.saturating_add(1), info.hash));
            unreadable = None;
            report.records += 1;
            report.first_seq.get_or_insert(info.seq);
            report.last_seq = Some(info.seq);
        }
    }

    if let Some((at, why, true)) = unreadable {
        return Err(VerifyError::Broken {
            at,
            seq: None,
            problem: Problem::NotJson(why),
        });
    }
    report.last_hash = expected.map(|(_, hash)| hex_str(&hash).to_owned());
    Ok(report)
}

fn at(path: &Path, line: u64) -> Location {
    Location {
        file: path.to_path_buf(),
        line,
    }
}

#[cfg(test)]
mod tests {
    use super::super::record::{Record, encode_line};
    use super::*;
    use std::io::Write;

    /// `n` chained lines starting at `first_seq` (genesis prev for seq 1).
    fn chain(first_seq: u64, n: u64) -> Vec<Vec<u8>> {
        let mut prev = if first_seq == 1 { GENESIS } else { [b'7'; 64] };
        (first_seq..first_seq + n)
            .map(|seq| {
                let mut buf = Vec::new();
                let rec = Record {
                    user_id: Some(format!("user-{seq:02}")),
                    ..Record::attempt(format!("req-{seq:02}"))
                };
                prev = encode_line(&mut buf, seq, "2026-11-24T06:49:26.123Z", &rec, &prev).unwrap();
                buf
            })
            .collect()
    }

    fn write(dir: &Path, name: &str, lines: &[Vec<u8>]) -> PathBuf {
        let path = dir.join(name);
        let mut f = File::create(&path).unwrap();
        for l in lines {
            f.write_all(l).unwrap();
        }
        path
    }

    fn broken(res: Result<VerifyReport, VerifyError>) -> (u64, Option<u64>, Problem) {
        match res {
            Err(VerifyError::Broken { at, seq, problem }) => (at.line, seq, problem),
            other => panic!("expected a broken chain, got {other:?}"),
        }
    }

    #[test]
    fn intact_chain_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "a.jsonl", &chain(1, 10));
        let r = verify(&[p]).unwrap();
        assert_eq!(
            (r.records, r.torn, r.first_seq, r.last_seq),
            (10, 0, Some(1), Some(10))
        );
        assert!(r.last_hash.is_some());
        assert_eq!(verify(&[]).unwrap().records, 0);
    }

    /// A line as written before the `caller` member existed, by the
    /// canonical form documented in `audit/mod.rs`.
    fn line_without_caller(seq: u64, prev: &HexHash) -> (Vec<u8>, HexHash) {
        use sha2::{Digest, Sha256};
        let body = format!(
            "{{\"seq\":{seq},\"ts\":\"2026-11-24T06:49:26.123Z\",\"event\":\"attempt\",\
             \"request_id\":\"old-{seq}\",\"client\":\"127.0.0.1:1\",\"user_id\":null,\
             \"sub_user_id\":null,\"task_id\":null,\"reason\":null,\"note\":null,\
             \"request\":null,\"residue\":null,\"upstream_status\":null,\
             \"upstream_code\":null,\"upstream_message\":null,\"latency_ms\":null,\
             \"prev\":\"{}\"}}",
            std::str::from_utf8(prev).unwrap()
        );
        let mut h = Sha256::new();
        h.update(prev);
        h.update(body.as_bytes());
        let hash: HexHash = hex::encode(h.finalize()).as_bytes().try_into().unwrap();
        let line = format!(
            "{},\"hash\":\"{}\"}}\n",
            &body[..body.len() - 1],
            std::str::from_utf8(&hash).unwrap()
        );
        (line.into_bytes(), hash)
    }

    #[test]
    fn a_file_from_before_the_caller_member_verifies_and_continues() {
        let dir = tempfile::tempdir().unwrap();
        let (first, h1) = line_without_caller(1, &GENESIS);
        let (second, h2) = line_without_caller(2, &h1);
        // The upgraded gateway continues the same file with the new member.
        let mut third = Vec::new();
        let rec = Record {
            caller: Some("billing".into()),
            ..Record::attempt("new-3")
        };
        encode_line(&mut third, 3, "2026-11-24T06:49:27.000Z", &rec, &h2).unwrap();
        assert!(
            String::from_utf8_lossy(&third).contains("\"client\":null,\"caller\":\"billing\",")
        );
        let p = write(dir.path(), "a.jsonl", &[first, second, third]);
        let r = verify(&[p]).unwrap();
        assert_eq!((r.records, r.first_seq, r.last_seq), (3, Some(1), Some(3)));
    }

    #[test]
    fn one_character_changed_is_a_bad_hash_on_that_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = chain(1, 10);
        let l = &mut lines[4];
        let pos = l.windows(7).position(|w| w == b"user-05").unwrap();
        l[pos + 6] = b'6';
        let p = write(dir.path(), "a.jsonl", &lines);
        assert_eq!(broken(verify(&[p])), (5, Some(5), Problem::BadHash));
    }

    #[test]
    fn changed_prev_or_seq_is_a_bad_hash() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = chain(1, 5);
        let text = String::from_utf8(lines[2].clone()).unwrap();
        lines[2] = text.replacen("\"seq\":3", "\"seq\":9", 1).into_bytes();
        let p = write(dir.path(), "a.jsonl", &lines);
        assert_eq!(broken(verify(&[p])), (3, Some(9), Problem::BadHash));
    }

    #[test]
    fn deleted_record_is_a_prev_mismatch_on_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = chain(1, 10);
        lines.remove(4);
        let p = write(dir.path(), "a.jsonl", &lines);
        let (line, seq, problem) = broken(verify(&[p]));
        assert_eq!((line, seq), (5, Some(6)));
        assert!(matches!(
            problem,
            Problem::PrevMismatch {
                after_unreadable: None,
                ..
            }
        ));
    }

    #[test]
    fn swapped_records_are_a_prev_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = chain(1, 10);
        lines.swap(3, 4);
        let p = write(dir.path(), "a.jsonl", &lines);
        let (line, seq, problem) = broken(verify(&[p]));
        assert_eq!((line, seq), (4, Some(5)));
        assert!(matches!(problem, Problem::PrevMismatch { .. }));
    }

    #[test]
    fn torn_line_in_the_middle_is_skipped_when_the_chain_links_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = chain(1, 6);
        lines.insert(3, b"{\"seq\":4,\"ts\":\"2026-11-\n".to_vec());
        let p = write(dir.path(), "a.jsonl", &lines);
        let r = verify(std::slice::from_ref(&p)).unwrap();
        assert_eq!((r.records, r.torn), (6, 1));
        assert_eq!(r.torn_lines, vec![at(&p, 4)]);
    }

    #[test]
    fn record_replaced_by_a_torn_line_is_a_prev_mismatch_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = chain(1, 6);
        lines[3] = b"{\"seq\":4,\"ts\":\"2026-11-\n".to_vec();
        let p = write(dir.path(), "a.jsonl", &lines);
        let (line, seq, problem) = broken(verify(&[p]));
        assert_eq!((line, seq), (5, Some(5)));
        assert!(matches!(
            problem,
            Problem::PrevMismatch {
                after_unreadable: Some(4),
                ..
            }
        ));
    }

    #[test]
    fn record_edited_into_invalid_json_is_caught_on_the_next_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = chain(1, 6);
        let pos = lines[2].iter().position(|&b| b == b':').unwrap();
        lines[2][pos] = b';';
        let p = write(dir.path(), "a.jsonl", &lines);
        let (line, _, problem) = broken(verify(&[p]));
        assert_eq!(line, 4);
        assert!(matches!(
            problem,
            Problem::PrevMismatch {
                after_unreadable: Some(3),
                ..
            }
        ));
    }

    #[test]
    fn torn_final_line_passes_only_without_a_newline() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = chain(1, 4);
        lines.push(b"{\"seq\":5,\"ts\":\"2026".to_vec());
        let p = write(dir.path(), "a.jsonl", &lines);
        let r = verify(&[p]).unwrap();
        assert_eq!((r.records, r.torn, r.last_seq), (4, 1, Some(4)));

        lines.last_mut().unwrap().push(b'\n');
        let p = write(dir.path(), "b.jsonl", &lines);
        let (line, seq, problem) = broken(verify(&[p]));
        assert_eq!((line, seq), (5, None));
        assert!(matches!(problem, Problem::NotJson(_)));
    }

    #[test]
    fn seq_one_must_link_to_genesis_but_a_tail_may_start_anywhere() {
        let dir = tempfile::tempdir().unwrap();
        let tail = write(dir.path(), "tail.jsonl", &chain(5, 3));
        let r = verify(&[tail]).unwrap();
        assert_eq!((r.records, r.first_seq), (3, Some(5)));

        let mut lines = chain(1, 3);
        let text = String::from_utf8(lines[0].clone()).unwrap();
        // Re-encode seq 1 with a non-genesis prev: a forged start.
        let mut buf = Vec::new();
        let rec = Record {
            user_id: Some("user-01".into()),
            ..Record::attempt("req-01")
        };
        encode_line(&mut buf, 1, "2026-11-24T06:49:26.123Z", &rec, &[b'1'; 64]).unwrap();
        assert_ne!(text.as_bytes(), &buf[..]);
        lines[0] = buf;
        let p = write(dir.path(), "forged.jsonl", &lines);
        let (line, seq, problem) = broken(verify(&[p]));
        assert_eq!((line, seq), (1, Some(1)));
        assert!(matches!(problem, Problem::PrevMismatch { .. }));
    }

    #[test]
    fn chain_spans_files_in_the_order_given() {
        let dir = tempfile::tempdir().unwrap();
        let lines = chain(1, 8);
        let a = write(dir.path(), "a.jsonl", &lines[..5]);
        let b = write(dir.path(), "b.jsonl", &lines[5..]);
        assert_eq!(verify(&[a.clone(), b.clone()]).unwrap().records, 8);
        let err = verify(&[b, a.clone()]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("{}:1: seq 1: prev mismatch", a.display())),
            "{text}"
        );
    }

    #[test]
    fn missing_file_is_an_io_error_naming_it() {
        let err = verify(&[PathBuf::from("/nonexistent/audit.jsonl")]).unwrap_err();
        assert!(matches!(err, VerifyError::Io { .. }));
        assert!(err.to_string().starts_with("/nonexistent/audit.jsonl: "));
    }
}
