//! Group commit: one thread owns every write transaction.
//!
//! Callers send a job (a closure over the transaction's [`Tables`]) and await its reply. The thread takes
//! whatever jobs are queued, applies them in order inside one transaction and commits once with
//! [`Durability::Immediate`], so every caller's write is on disk when its reply arrives while one fsync
//! covers many concurrent writes. Under a single caller this degrades to one transaction per call.
//!
//! A job may fail with [`ErrorKind::Conflict`] or [`ErrorKind::NotFound`] only before it has written
//! anything; the batch then commits without it. Any other failure may have left a partial write, so the
//! batch is rolled back and every job is re-run alone, isolating the failing one.

use std::sync::Arc;
use std::thread::JoinHandle;

use redb::{Database, Durability};
use tokio::sync::{mpsc, oneshot};

use super::Tables;
use crate::{Error, ErrorKind, Result, Shared};

/// Jobs queued before `run` waits for room (back-pressure on writers).
const QUEUE: usize = 16 * 1024;
/// Jobs committed together at most; bounds the latency a large backlog adds to the first job.
const MAX_BATCH: usize = 4096;

/// One queued write.
trait Job: Send {
    /// Runs the job on the batch's tables; true when they may hold a partial write and the batch must
    /// be rolled back.
    fn apply(&mut self, tables: &mut Tables<'_>) -> bool;
    /// Replies to the caller: the job's own error, else `commit`'s error, else its value.
    fn finish(self: Box<Self>, commit: Option<&Shared>);
}

struct Task<F, R> {
    op: F,
    out: Option<Result<R>>,
    reply: oneshot::Sender<Result<R>>,
}

impl<F, R> Job for Task<F, R>
where
    F: FnMut(&mut Tables<'_>) -> Result<R> + Send,
    R: Send,
{
    fn apply(&mut self, tables: &mut Tables<'_>) -> bool {
        let out = (self.op)(tables);
        let poisoned = matches!(&out, Err(e) if !e.kind.is_refusal());
        self.out = Some(out);
        poisoned
    }

    fn finish(self: Box<Self>, commit: Option<&Shared>) {
        let result = match (self.out, commit) {
            (Some(Err(e)), _) => Err(e),
            (_, Some(e)) => Err(e.to_error()),
            (Some(Ok(v)), None) => Ok(v),
            (None, None) => Err(Error::new(
                ErrorKind::Unavailable,
                "write job was not applied",
            )),
        };
        // The caller may have given up waiting; the write stands regardless.
        let _ = self.reply.send(result);
    }
}

/// Handle to the writer thread; dropping it drains the queue and joins the thread.
pub(super) struct Writer {
    jobs: Option<mpsc::Sender<Box<dyn Job>>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts the writer thread for `db`.
    pub(super) fn start(db: Arc<Database>) -> Result<Self> {
        let (jobs, rx) = mpsc::channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("zhibo-redb-writer".into())
            .spawn(move || writer_loop(&db, rx))
            .map_err(Error::backend)?;
        Ok(Writer {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Runs `op` in a durable write transaction (possibly shared with other callers' jobs).
    ///
    /// `op` may run more than once (after a rolled-back batch), so it must not consume its captures.
    /// It must return [`ErrorKind::Conflict`] / [`ErrorKind::NotFound`] only before writing.
    pub(super) async fn run<R, F>(&self, op: F) -> Result<R>
    where
        F: FnMut(&mut Tables<'_>) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let jobs = self.jobs.as_ref().ok_or_else(closed)?;
        let (reply, rx) = oneshot::channel();
        let task = Task {
            op,
            out: None,
            reply,
        };
        jobs.send(Box::new(task)).await.map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue ends the loop once queued jobs are done; joining releases the database
        // file, so the same path can be reopened as soon as the backend is dropped.
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn closed() -> Error {
    Error::new(ErrorKind::Unavailable, "embedded store writer has stopped")
}

fn writer_loop(db: &Database, mut rx: mpsc::Receiver<Box<dyn Job>>) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        commit_batch(db, batch);
    }
}

fn commit_batch(db: &Database, mut batch: Vec<Box<dyn Job>>) {
    let mut tx = match db.begin_write() {
        Ok(tx) => tx,
        Err(e) => {
            let e = Error::backend(e).into_shared();
            batch.into_iter().for_each(|job| job.finish(Some(&e)));
            return;
        }
    };
    // Immediate is redb's default; stated because `append` promises durability on return.
    tx.set_durability(Durability::Immediate);
    let applied = Tables::open(&tx).and_then(|mut tables| {
        let poisoned = batch.iter_mut().any(|job| job.apply(&mut tables));
        if !poisoned {
            tables.housekeeping()?;
        }
        Ok(poisoned)
    });
    let poisoned = match applied {
        Ok(poisoned) => poisoned,
        Err(e) => {
            // Opening the tables or the upkeep failed: nothing in this transaction can be trusted.
            let _ = tx.abort();
            let e = e.into_shared();
            batch.into_iter().for_each(|job| job.finish(Some(&e)));
            return;
        }
    };
    if poisoned {
        let rolled_back = match tx.abort() {
            Ok(()) => Error::new(ErrorKind::Unavailable, "write rolled back"),
            Err(e) => Error::backend(e),
        }
        .into_shared();
        if batch.len() == 1 {
            // The job's own error is what the caller gets.
            batch
                .into_iter()
                .for_each(|job| job.finish(Some(&rolled_back)));
        } else {
            batch
                .into_iter()
                .for_each(|job| commit_batch(db, vec![job]));
        }
        return;
    }
    match tx.commit() {
        Ok(()) => batch.into_iter().for_each(|job| job.finish(None)),
        Err(e) => {
            let e = Error::backend(e).into_shared();
            batch.into_iter().for_each(|job| job.finish(Some(&e)));
        }
    }
}
