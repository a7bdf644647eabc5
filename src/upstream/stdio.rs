//! Stdio client transport: newline-delimited JSON-RPC over a child's stdin/stdout.
//!
//! Ours rather than rmcp's `TokioChildProcess` because the bytes must be seen to keep the results
//! of custom requests raw ([`super::raw`]). Shutdown follows the MCP stdio sequence as rmcp's does:
//! close stdin, wait, SIGTERM the process group, wait, kill.

use std::sync::Arc;
use std::time::Duration;

use process_wrap::tokio::{ChildWrapper, CommandWrap};
use rmcp::{
    RoleClient,
    service::{RxJsonRpcMessage, TxJsonRpcMessage},
    transport::Transport,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::process::{ChildStderr, ChildStdin};
use tokio::sync::mpsc;

use super::ProgressRouter;
use super::lane::{Pending, StdioLane};
use super::raw::RawIds;

/// How long a child gets to exit after stdin closes, and again after SIGTERM.
const EXIT_WAIT: Duration = Duration::from_secs(3);
/// The longest line read from a child (a bigger message ends the connection).
const MAX_LINE: usize = 64 * 1024 * 1024;
/// How much of a child's stderr is kept to explain its early exit ([`StderrTail`]).
const TAIL_LINES: usize = 10;
const TAIL_BYTES: usize = 2048;
/// How long a dropped transport's child may take to exit on its own before it is killed, so that
/// one that exited just before its stdout closed is reported with its own status.
const DROP_GRACE: Duration = Duration::from_millis(200);

/// The last lines a child wrote to stderr (at most [`TAIL_LINES`] and [`TAIL_BYTES`]): shown with
/// its exit status when it ends before `initialize`. The whole stderr still goes to the log.
#[derive(Default)]
pub struct StderrTail {
    lines: std::collections::VecDeque<String>,
    bytes: usize,
}

impl StderrTail {
    pub fn push(&mut self, line: &str) {
        let mut line = line.trim_end().to_string();
        if line.len() > TAIL_BYTES {
            let mut end = TAIL_BYTES;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
        }
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.lines.len() > TAIL_LINES || self.bytes > TAIL_BYTES {
            match self.lines.pop_front() {
                Some(old) => self.bytes -= old.len(),
                None => break,
            }
        }
    }

    /// The kept lines, oldest first, joined by `" | "`.
    pub fn joined(&self) -> String {
        self.lines.iter().cloned().collect::<Vec<_>>().join(" | ")
    }
}

/// The child's exit status once whoever reaps it (close, or the kill after a drop) has seen it exit
/// on its own: a child killed by the broker leaves it empty.
pub type ExitSlot = Arc<std::sync::OnceLock<std::process::ExitStatus>>;

pub struct StdioTransport {
    child: Option<Box<dyn ChildWrapper>>,
    stdin: Arc<tokio::sync::Mutex<Option<ChildStdin>>>,
    rx: mpsc::Receiver<RxJsonRpcMessage<RoleClient>>,
    ids: RawIds,
    reader: tokio::task::JoinHandle<()>,
    /// Lane calls on this connection: their responses are taken off the wire by the reader.
    pending: Arc<Pending>,
    /// Filled when the child is seen to have exited by itself (see [`ExitSlot`]).
    exit: ExitSlot,
}

impl StdioTransport {
    /// Spawn `cmd` with piped stdio; returns the transport and the child's stderr. `router` gets
    /// the lane's progress (see [`super::lane`]).
    pub fn spawn(
        server: Arc<str>,
        mut cmd: CommandWrap,
        router: Arc<ProgressRouter>,
    ) -> std::io::Result<(Self, Option<ChildStderr>, ExitSlot)> {
        cmd.command_mut()
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn()?;
        let stdout = child
            .stdout()
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout"))?;
        let stdin = child
            .stdin()
            .take()
            .ok_or_else(|| std::io::Error::other("no stdin"))?;
        let stderr = child.stderr().take();
        let ids = RawIds::default();
        let (tx, rx) = mpsc::channel(256);
        let decode = ids.clone();
        let pending = Pending::open();
        let lane = pending.clone();
        let reader = tokio::spawn(async move {
            // However the reader ends, lane calls waiting on it fail at once.
            struct Close(Arc<Pending>);
            impl Drop for Close {
                fn drop(&mut self) {
                    self.0.close();
                }
            }
            let lane = Close(lane);
            let mut lines = tokio::io::BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match (&mut lines)
                    .take(MAX_LINE as u64)
                    .read_until(b'\n', &mut buf)
                    .await
                {
                    Ok(0) => break,
                    Ok(_) if buf.last() != Some(&b'\n') && buf.len() >= MAX_LINE => {
                        tracing::warn!(server = %server, "upstream message exceeds {MAX_LINE} bytes");
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(server = %server, error = %e, "reading the upstream's stdout failed");
                        break;
                    }
                }
                let Ok(text) = std::str::from_utf8(&buf) else {
                    tracing::warn!(server = %server, "upstream wrote a line that is not UTF-8");
                    continue;
                };
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                // The lane's response or progress: handled here, in wire order, never seen by rmcp.
                if lane.0.route(text, &router) {
                    continue;
                }
                match decode.decode(text) {
                    Ok(m) => {
                        if tx.send(m).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(server = %server, error = %e, "unparsable message from upstream")
                    }
                }
            }
        });
        let exit = ExitSlot::default();
        Ok((
            Self {
                child: Some(child),
                stdin: Arc::new(tokio::sync::Mutex::new(Some(stdin))),
                rx,
                ids,
                reader,
                pending,
                exit: exit.clone(),
            },
            stderr,
            exit,
        ))
    }
}

impl StdioTransport {
    /// The lane onto this child: the same stdin, answered by this transport's reader.
    pub fn lane(&self) -> StdioLane {
        StdioLane {
            stdin: self.stdin.clone(),
            pending: self.pending.clone(),
        }
    }
}

impl Transport<RoleClient> for StdioTransport {
    type Error = std::io::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleClient>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        self.ids.note(&item);
        let line = serde_json::to_vec(&item).map(|mut v| {
            v.push(b'\n');
            v
        });
        let stdin = self.stdin.clone();
        async move {
            let line = line.map_err(std::io::Error::other)?;
            let mut guard = stdin.lock().await;
            let w = guard
                .as_mut()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "closed"))?;
            w.write_all(&line).await?;
            w.flush().await
        }
    }

    fn receive(&mut self) -> impl Future<Output = Option<RxJsonRpcMessage<RoleClient>>> + Send {
        self.rx.recv()
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        self.stdin.lock().await.take();
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Ok(Ok(status)) = tokio::time::timeout(EXIT_WAIT, child.wait()).await {
            let _ = self.exit.set(status);
        } else {
            #[cfg(unix)]
            {
                const SIGTERM: i32 = 15;
                let _ = child.signal(SIGTERM);
                if tokio::time::timeout(EXIT_WAIT, child.wait()).await.is_ok() {
                    self.reader.abort();
                    return Ok(());
                }
            }
            Box::into_pin(child.kill()).await?;
        }
        self.reader.abort();
        Ok(())
    }
}

impl Drop for StdioTransport {
    fn drop(&mut self) {
        self.reader.abort();
        if let Some(mut child) = self.child.take() {
            // `kill` (not `start_kill`) also reaps it, so no zombie is left.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let exit = self.exit.clone();
                rt.spawn(async move {
                    match tokio::time::timeout(DROP_GRACE, child.wait()).await {
                        Ok(Ok(status)) => {
                            let _ = exit.set(status);
                        }
                        _ => {
                            let _ = Box::into_pin(child.kill()).await;
                        }
                    }
                });
            } else {
                let _ = child.start_kill();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rmcp::model::{
        CustomRequest, JsonRpcMessage, NumberOrString, ProgressToken, ServerNotification,
    };

    use super::super::lane::{Lane, LaneKind, next_id};
    use super::*;

    /// A child that answers one request line with progress, a log, then the response.
    const CHILD: &str = r#"read line
id=$(printf '%s' "$line" | sed 's/^{"jsonrpc":"2.0","id":\([0-9]*\).*/\1/')
printf '{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":%s,"progress":1}}\n' "$id"
printf '{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":"hi"}}\n'
printf '{"jsonrpc":"2.0","id":%s,"result":{"zeta":1,"execution":{"taskSupport":"optional"},"alpha":2}}\n' "$id"
sleep 5
"#;

    #[test]
    fn the_stderr_tail_keeps_the_last_lines_within_its_bounds() {
        let mut tail = StderrTail::default();
        for i in 0..25 {
            tail.push(&format!("line {i}\n"));
        }
        assert_eq!(tail.joined().split(" | ").next(), Some("line 15"));
        assert!(tail.joined().ends_with("line 24"));
        tail.push(&"x".repeat(5000));
        assert_eq!(tail.lines.len(), 1);
        assert_eq!(tail.bytes, TAIL_BYTES);
    }

    #[tokio::test]
    async fn the_lanes_response_and_progress_bypass_rmcp_and_the_rest_reaches_it() {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", CHILD]);
        let router = Arc::new(ProgressRouter::default());
        let spawned = StdioTransport::spawn("t".into(), CommandWrap::from(cmd), router.clone());
        let Ok((mut transport, _, _)) = spawned else {
            panic!("cannot run sh");
        };
        let lane = Lane::new(LaneKind::Stdio(transport.lane()), router.clone(), None);
        let id = next_id();
        let mut progress = router.route(&ProgressToken(NumberOrString::Number(id)));
        let req = CustomRequest::new("tools/call", Some(serde_json::json!({"name": "echo"})));
        let got = tokio::time::timeout(Duration::from_secs(10), lane.request(id, &req, None)).await;
        let Ok(Ok(v)) = got else {
            panic!("{got:?}");
        };
        assert_eq!(
            v.to_string(),
            r#"{"zeta":1,"execution":{"taskSupport":"optional"},"alpha":2}"#
        );
        assert_eq!(progress.try_recv().map(|p| p.progress).ok(), Some(1.0));
        // rmcp sees the log, and neither the lane's progress nor its response.
        let m = tokio::time::timeout(Duration::from_secs(5), transport.receive()).await;
        assert!(
            matches!(&m, Ok(Some(JsonRpcMessage::Notification(n)))
                if matches!(n.notification, ServerNotification::LoggingMessageNotification(_))),
            "{m:?}"
        );
        let _ = transport.close().await;
        // The reader ended: the lane refuses at once.
        let after = lane.request(next_id(), &req, None).await;
        assert!(after.is_err());
    }
}
