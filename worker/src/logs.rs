//! Following what a job's workers print: the node daemon reads each worker's output file
//! (stdout and stderr, `lease::process`) from where it last stopped and hands the new
//! complete lines to the job's driver (`NodeManager/StreamLogs`), each with the pid and
//! the task or actor that printed it.
//!
//! A worker names what it runs by a marker line in its output (`:ionet_task:NAME`,
//! written by the core worker when the task or actor it runs changes, see
//! `ionet::raw::name_output`): the lines after it are that task's. Markers are not passed
//! on; one written after a partial line (a print without its newline) is found inside
//! the line and split off. A partial last line waits for its end; a line longer than
//! [`MAX_LINE`] is cut there. One pass reads at most [`MAX_PASS_READ`] bytes of a job's
//! output (the rest waits for the next pass, and the batch says it is behind).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use ionet_common::rpc::proto::node::LogLine;

use ionet_common::worker_env::OUTPUT_NAME_MARKER as TASK_MARKER;
/// The longest line passed on whole.
pub const MAX_LINE: usize = 16 * 1024;
/// The most bytes of a job's output read in one pass, over all its files.
pub const MAX_PASS_READ: u64 = 1024 * 1024;

/// The part of one worker's output read so far.
#[derive(Default)]
struct FileTail {
    offset: u64,
    /// An incomplete last line.
    partial: Vec<u8>,
    /// The task or actor the lines are from.
    name: String,
}

impl FileTail {
    /// Splits `bytes` (read after `offset`) into complete lines, updating the name on
    /// markers.
    fn take(&mut self, pid: u32, bytes: &[u8], out: &mut Vec<LogLine>) {
        self.offset += bytes.len() as u64;
        let mut pending = std::mem::take(&mut self.partial);
        pending.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(end) = pending[start..].iter().position(|byte| *byte == b'\n') {
            self.line(pid, &pending[start..start + end], out);
            start += end + 1;
        }
        pending.drain(..start);
        self.partial = pending;
        if self.partial.len() > MAX_LINE {
            let long = std::mem::take(&mut self.partial);
            self.line(pid, &long, out);
        }
    }

    fn line(&mut self, pid: u32, line: &[u8], out: &mut Vec<LogLine>) {
        let line = &line[..line.len().min(MAX_LINE)];
        let text = String::from_utf8_lossy(line);
        let text = text.strip_suffix('\r').unwrap_or(&text);
        if let Some(at) = text.find(TASK_MARKER) {
            if at > 0 {
                out.push(LogLine { pid, name: self.name.clone(), text: text[..at].to_string() });
            }
            self.name = text[at + TASK_MARKER.len()..].to_string();
            return;
        }
        out.push(LogLine { pid, name: self.name.clone(), text: text.to_string() });
    }
}

/// One follower of one job's output on this node.
#[derive(Default)]
pub struct JobTail {
    files: std::collections::HashMap<PathBuf, FileTail>,
}

impl JobTail {
    /// Reads what each of `files` (pid, path) gained since the last pass, up to
    /// [`MAX_PASS_READ`] bytes in all: the new lines, and whether every file was read to
    /// its end. A file that cannot be read is skipped this pass.
    pub fn pass(&mut self, files: &[(u32, PathBuf)]) -> (Vec<LogLine>, bool) {
        let mut lines = Vec::new();
        let mut budget = MAX_PASS_READ;
        let mut caught_up = true;
        for (pid, path) in files {
            let tail = self.files.entry(path.clone()).or_default();
            if let Ok((bytes, more)) = read_from(path, tail.offset, budget) {
                budget -= bytes.len() as u64;
                caught_up &= !more;
                tail.take(*pid, &bytes, &mut lines);
            }
        }
        (lines, caught_up)
    }
}

/// Ray's prefix of a line: `(name pid=…, ip=…)`.
pub fn prefix_of(line: &LogLine, ip: &str) -> String {
    if line.name.is_empty() {
        format!("(pid={}, ip={ip})", line.pid)
    } else {
        format!("({} pid={}, ip={ip})", line.name, line.pid)
    }
}

/// The host part of `host:port`.
pub fn ip_of(address: &str) -> &str {
    // A node serving TLS is listed as `https://host:port`.
    ionet_common::tls::host_of(address)
}

/// Up to `limit` bytes of `path` from `offset`, and whether more lie beyond them.
fn read_from(path: &Path, offset: u64, limit: u64) -> std::io::Result<(Vec<u8>, bool)> {
    let mut file = std::fs::File::open(path)?;
    let length = file.metadata()?.len();
    if length <= offset {
        return Ok((Vec::new(), false));
    }
    file.seek(SeekFrom::Start(offset))?;
    let wanted = (length - offset).min(limit);
    let mut bytes = Vec::with_capacity(wanted as usize);
    file.take(wanted).read_to_end(&mut bytes)?;
    Ok((bytes, length - offset > wanted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_names_the_host_whatever_the_scheme() {
        assert_eq!(ip_of("127.0.0.1:4000"), "127.0.0.1");
        assert_eq!(ip_of("https://10.0.0.7:4000"), "10.0.0.7");
    }

    fn texts(lines: &[LogLine]) -> Vec<(String, String)> {
        lines.iter().map(|line| (line.name.clone(), line.text.clone())).collect()
    }

    #[test]
    fn lines_carry_the_task_named_before_them_and_partial_lines_wait() {
        let mut tail = FileTail::default();
        let mut out = Vec::new();
        tail.take(7, b"boot\n:ionet_task:train\nepoch 1\nepo", &mut out);
        assert_eq!(texts(&out), [("".into(), "boot".into()), ("train".into(), "epoch 1".into())]);
        out.clear();
        tail.take(7, b"ch 2\r\n:ionet_task:Model.step\nloss 0.5\n", &mut out);
        assert_eq!(texts(&out), [("train".into(), "epoch 2".into()), ("Model.step".into(), "loss 0.5".into())]);
        assert_eq!(tail.offset, 72);
        // A marker after a print without its newline is split off that line.
        out.clear();
        tail.take(7, b"Loading:ionet_task:g\ndone\n", &mut out);
        assert_eq!(texts(&out), [("Model.step".into(), "Loading".into()), ("g".into(), "done".into())]);
        assert!(out.iter().all(|line| line.pid == 7));
    }

    #[test]
    fn an_endless_line_is_cut() {
        let mut tail = FileTail::default();
        let mut out = Vec::new();
        tail.take(1, &vec![b'x'; MAX_LINE + 10], &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].text.len(), MAX_LINE);
        assert!(tail.partial.is_empty());
    }

    #[test]
    fn a_pass_reads_only_what_each_file_gained() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.log");
        std::fs::write(&path, "one\ntw").unwrap();
        let files = vec![(3, path.clone())];
        let mut job = JobTail::default();
        assert_eq!(texts(&job.pass(&files).0), [("".into(), "one".into())]);
        assert!(job.pass(&files).0.is_empty());
        std::fs::write(&path, "one\ntwo\nthree\n").unwrap();
        assert_eq!(texts(&job.pass(&files).0), [("".into(), "two".into()), ("".into(), "three".into())]);
        let missing = vec![(4, dir.path().join("gone.log"))];
        assert!(job.pass(&missing).0.is_empty());
        // A pass reads at most its budget, and says when it is behind.
        let big = dir.path().join("big.log");
        std::fs::write(&big, "x".repeat(MAX_PASS_READ as usize + 10) + "\n").unwrap();
        let files = vec![(5, big)];
        assert!(!job.pass(&files).1, "behind after one pass");
        let (lines, caught_up) = job.pass(&files);
        assert!(caught_up && lines.len() == 1, "then the rest");
    }
}
