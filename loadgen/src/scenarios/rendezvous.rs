//! Steps the `--procs` workers of one run take together: each worker posts a number under a
//! step's name (a file `NAME.K` in the directory the parent made for the run), and a worker
//! that needs every worker's number for that step waits until all of them are there.
//!
//! In a run of one process there is nobody to wait for: a post is kept in memory and a gather
//! returns it at once.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// This worker's place in the run.
pub struct Rendezvous {
    /// The run's directory (`None` in a run of one process).
    dir: Option<PathBuf>,
    /// This worker, of `workers`.
    worker: usize,
    workers: usize,
    /// Posts of a run of one process.
    posted: Vec<(String, u64)>,
}

impl Rendezvous {
    /// Worker `worker` of `workers`, meeting in `dir` (the directory of its `--worker-dump`),
    /// or a run of one process when `dir` is `None`.
    pub fn new(dir: Option<PathBuf>, worker: usize, workers: usize) -> Rendezvous {
        Rendezvous {
            dir,
            worker,
            workers: workers.max(1),
            posted: Vec::new(),
        }
    }

    /// Posts this worker's `value` for `step`. The file is written under another name and
    /// renamed, so a reader never sees half a number.
    pub fn post(&mut self, step: &str, value: u64) -> std::io::Result<()> {
        let Some(dir) = &self.dir else {
            self.posted.push((step.to_string(), value));
            return Ok(());
        };
        let tmp = dir.join(format!("{step}.{}.tmp", self.worker));
        std::fs::write(&tmp, value.to_string())?;
        std::fs::rename(&tmp, dir.join(format!("{step}.{}", self.worker)))
    }

    /// Every worker's value for `step`, if all have posted it.
    pub fn gather(&self, step: &str) -> Option<Vec<u64>> {
        let Some(dir) = &self.dir else {
            return self
                .posted
                .iter()
                .find(|(s, _)| s == step)
                .map(|(_, v)| vec![*v]);
        };
        (0..self.workers)
            .map(|k| {
                std::fs::read_to_string(dir.join(format!("{step}.{k}")))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// Waits until every worker has posted `step` or `deadline` passes, calling `between`
    /// (which keeps the connections served) every few milliseconds.
    pub fn wait(
        &self,
        step: &str,
        deadline: Instant,
        mut between: impl FnMut() -> std::io::Result<()>,
    ) -> std::io::Result<Option<Vec<u64>>> {
        loop {
            if let Some(values) = self.gather(step) {
                return Ok(Some(values));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            between()?;
            if self.dir.is_some() {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_is_complete_only_when_every_worker_posted_it() {
        let dir = std::env::temp_dir().join(format!("rendezvous-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut first = Rendezvous::new(Some(dir.clone()), 0, 2);
        let mut second = Rendezvous::new(Some(dir.clone()), 1, 2);
        first.post("ready", 7).unwrap();
        assert_eq!(second.gather("ready"), None, "worker 1 has not posted");
        let soon = Instant::now() + Duration::from_millis(20);
        assert_eq!(second.wait("ready", soon, || Ok(())).unwrap(), None);
        second.post("ready", 9).unwrap();
        assert_eq!(first.gather("ready"), Some(vec![7, 9]));
        assert_eq!(first.gather("other"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn one_process_meets_itself() {
        let mut alone = Rendezvous::new(None, 0, 1);
        assert_eq!(alone.gather("ready"), None);
        alone.post("ready", 3).unwrap();
        assert_eq!(alone.gather("ready"), Some(vec![3]));
    }
}
