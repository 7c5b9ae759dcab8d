//! The process tree as procfs shows it: which processes are below the supervisor (or below an
//! nginx master), read in one pass over /proc.

use std::collections::HashMap;

/// One line of /proc/PID/stat, the fields we need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    pub comm: String,
    pub state: char,
    pub ppid: i32,
    /// Its process group: what a hook left running is found by it.
    pub pgrp: i32,
    /// Clock ticks after boot; with the pid, it names one process for good (pids get reused).
    pub start_time: u64,
}

impl ProcStat {
    /// Parses `/proc/PID/stat`. The command name sits in parentheses and may itself hold spaces
    /// and parentheses, so the fields after it are found from the last `)`.
    pub fn parse(line: &str) -> Option<Self> {
        let open = line.find('(')?;
        let close = line.rfind(')')?;
        let pid = line[..open].trim().parse().ok()?;
        let comm = line.get(open + 1..close)?.to_owned();
        let rest: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
        // rest[0] is field 3 (state); starttime is field 22.
        Some(Self {
            pid,
            comm,
            state: rest.first()?.chars().next()?,
            ppid: rest.get(1)?.parse().ok()?,
            pgrp: rest.get(2)?.parse().ok()?,
            start_time: rest.get(19)?.parse().ok()?,
        })
    }

    /// The process's line, or `None` when it cannot be read for any reason. Where "cannot be
    /// read" must not pass for "gone", use [`ProcStat::read_checked`].
    pub fn read(pid: i32) -> Option<Self> {
        Self::read_checked(pid).ok().flatten()
    }

    /// `Ok(None)` only when no such process exists; any other failure (too many open files,
    /// permission denied) is an error: the process may well be there.
    pub fn read_checked(pid: i32) -> std::io::Result<Option<Self>> {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(line) => Ok(Self::parse(&line)),
            Err(err) if is_gone(&err) => Ok(None),
            Err(err) => Err(err),
        }
    }
}

/// Whether a failed read of /proc/PID/... means the process is gone: no entry (ENOENT), or it
/// exited between the open and the read (ESRCH).
fn is_gone(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOENT | libc::ESRCH))
}

/// Whether a failed read of /proc/PID/stat means that one process is hidden from us (an LSM
/// policy, or /proc mounted with hidepid), not that the look failed. Such a process is left out
/// of the table without leaving a hole: it cannot be nginx's in practice. The masters are held
/// by pidfd and waited for through it, and their workers run as our own user (or we are root,
/// and read every process): the drain must not wait out its budget for a stranger.
/// Anything else (EMFILE, ENFILE, ENOMEM, EIO...) is a look that could not see.
fn is_not_ours_to_see(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EACCES | libc::EPERM))
}

/// A snapshot of every process's parent.
#[derive(Debug, Default)]
pub struct ProcessTable {
    by_pid: HashMap<i32, ProcStat>,
    /// The first process listed whose line could not be read (too many open files, say): the
    /// table may miss processes that exist.
    unreadable: Option<(i32, std::io::ErrorKind, String)>,
}

impl ProcessTable {
    /// Every process /proc lists. A process that exits between the listing and the read is
    /// left out, and so is one we are denied; one that cannot be read for another reason is
    /// left out too, and noted ([`ProcessTable::read_complete`]).
    pub fn read() -> std::io::Result<Self> {
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc")? {
            let entry = entry?;
            if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
                pids.push(pid);
            }
        }
        Ok(Self::from_reads(
            pids.into_iter().map(|pid| (pid, ProcStat::read_checked(pid))),
        ))
    }

    /// The table from each listed process's read of its stat line.
    fn from_reads(reads: impl IntoIterator<Item = (i32, std::io::Result<Option<ProcStat>>)>) -> Self {
        let mut table = Self::default();
        for (pid, read) in reads {
            match read {
                Ok(Some(stat)) => {
                    table.by_pid.insert(pid, stat);
                }
                Ok(None) => {}
                Err(err) if is_not_ours_to_see(&err) => {}
                Err(err) => {
                    table.unreadable.get_or_insert((pid, err.kind(), err.to_string()));
                }
            }
        }
        table
    }

    /// Every process, or an error when /proc cannot be listed or one of its processes cannot
    /// be read (other than denied to us): a table with a hole must not pass for one that shows
    /// every process.
    pub fn read_complete() -> std::io::Result<Self> {
        Self::read()?.complete()
    }

    fn complete(self) -> std::io::Result<Self> {
        match &self.unreadable {
            None => Ok(self),
            Some((pid, kind, err)) => Err(std::io::Error::new(
                *kind,
                format!("reading /proc/{pid}/stat: {err}"),
            )),
        }
    }

    pub fn from_stats(stats: impl IntoIterator<Item = ProcStat>) -> Self {
        Self {
            by_pid: stats.into_iter().map(|s| (s.pid, s)).collect(),
            unreadable: None,
        }
    }

    pub fn get(&self, pid: i32) -> Option<&ProcStat> {
        self.by_pid.get(&pid)
    }

    /// Every process below `root` (not `root` itself), parents before children.
    pub fn descendants(&self, root: i32) -> Vec<&ProcStat> {
        let mut children: HashMap<i32, Vec<&ProcStat>> = HashMap::new();
        for stat in self.by_pid.values() {
            children.entry(stat.ppid).or_default().push(stat);
        }
        let mut found = Vec::new();
        let mut queue = vec![root];
        while let Some(parent) = queue.pop() {
            for child in children.get(&parent).into_iter().flatten() {
                if child.pid != root {
                    found.push(*child);
                    queue.push(child.pid);
                }
            }
        }
        found
    }

    /// The live processes of a process group (zombies left out), by pid.
    pub fn members_of_group(&self, pgrp: i32) -> impl Iterator<Item = &ProcStat> {
        let mut members: Vec<&ProcStat> = self
            .by_pid
            .values()
            .filter(|s| s.pgrp == pgrp && s.state != 'Z')
            .collect();
        members.sort_by_key(|s| s.pid);
        members.into_iter()
    }

    pub fn children(&self, parent: i32) -> impl Iterator<Item = &ProcStat> {
        self.by_pid.values().filter(move |s| s.ppid == parent)
    }
}

/// The title nginx gives a process ("nginx: worker process"), for logs.
pub fn title(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            let text = String::from_utf8_lossy(&raw).replace('\0', " ");
            text.trim().to_owned()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_even_with_odd_command_names() {
        let line = "4242 (nginx) S 4241 4241 4241 0 -1 4194624 100 0 0 0 1 2 0 0 20 0 1 0 987654 10000 200 18446744073709551615";
        let stat = ProcStat::parse(line).unwrap();
        assert_eq!(
            (
                stat.pid,
                stat.comm.as_str(),
                stat.state,
                stat.ppid,
                stat.pgrp,
                stat.start_time
            ),
            (4242, "nginx", 'S', 4241, 4241, 987654)
        );

        let odd = "7 (a) b (c)) Z 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 55 0 0 0";
        let stat = ProcStat::parse(odd).unwrap();
        assert_eq!(
            (stat.comm.as_str(), stat.state, stat.ppid, stat.start_time),
            ("a) b (c)", 'Z', 1, 55)
        );

        for bad in ["", "12", "12 (x", "x (y) S 1", "12 (x) S notanumber 1 1"] {
            assert_eq!(ProcStat::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn descendants_include_grandchildren_and_nothing_else() {
        let stat = |pid, ppid| ProcStat {
            pid,
            comm: "nginx".into(),
            state: 'S',
            ppid,
            pgrp: 1,
            start_time: 1,
        };
        // 1 -> 10 (supervisor) -> 20 (master) -> 30, 31 (workers); 40 was reparented to 10.
        let table = ProcessTable::from_stats([
            stat(1, 0),
            stat(10, 1),
            stat(20, 10),
            stat(30, 20),
            stat(31, 20),
            stat(40, 10),
            stat(50, 1),
        ]);
        let mut below: Vec<i32> = table.descendants(10).iter().map(|s| s.pid).collect();
        below.sort();
        assert_eq!(below, [20, 30, 31, 40]);
        let mut workers: Vec<i32> = table.children(20).map(|s| s.pid).collect();
        workers.sort();
        assert_eq!(workers, [30, 31]);
        assert!(table.descendants(30).is_empty());
    }

    #[test]
    fn this_process_is_in_the_live_table() {
        let table = ProcessTable::read_complete().unwrap();
        let me = table.get(std::process::id() as i32).unwrap();
        assert_eq!(me.ppid, nix::unistd::getppid().as_raw());
        assert_eq!(me.pgrp, nix::unistd::getpgrp().as_raw());
    }

    #[test]
    fn a_process_not_ours_to_see_leaves_no_hole_but_a_failed_look_does() {
        let stat = |pid| ProcStat {
            pid,
            comm: "nginx".into(),
            state: 'S',
            ppid: 1,
            pgrp: 1,
            start_time: 1,
        };
        let table_with = |errno| {
            ProcessTable::from_reads([
                (10, Ok(Some(stat(10)))),
                (20, Err(std::io::Error::from_raw_os_error(errno))),
                (30, Ok(None)),
            ])
            .complete()
        };
        // An LSM or hidepid denying one process (EACCES, EPERM): the table is still whole.
        for errno in [libc::EACCES, libc::EPERM] {
            let table = table_with(errno).unwrap_or_else(|err| panic!("errno {errno}: {err}"));
            assert!(table.get(10).is_some());
            assert!(table.get(20).is_none());
        }
        // A look that could not see: the table may miss a process that exists.
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOMEM, libc::EIO, libc::EAGAIN] {
            let err = table_with(errno).expect_err("a hole in the table");
            assert!(err.to_string().contains("/proc/20/stat"), "{err}");
        }
    }

    #[test]
    fn only_a_process_that_does_not_exist_reads_as_gone() {
        // Above the kernel's PID_MAX_LIMIT: no process has it.
        assert!(matches!(ProcStat::read_checked(1 << 23), Ok(None)));
        let me = ProcStat::read_checked(std::process::id() as i32).unwrap();
        assert!(me.is_some());
        let exhausted = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert!(!is_gone(&exhausted), "too many open files is not gone");
        assert!(is_gone(&std::io::Error::from_raw_os_error(libc::ESRCH)));
    }
}
