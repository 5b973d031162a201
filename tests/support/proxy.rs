//! A loopback TCP forwarder between switchboard and `redis-server` that can
//! be frozen: it then stops forwarding in both directions while keeping every
//! socket open (nothing is sent, no FIN, no RST), which is what a network that
//! drops everything, a NAT that forgot a flow or a black-holed route looks
//! like from either end. A connection frozen for good is the same, to its
//! client, as one cut without a FIN (which loopback cannot do).
//!
//! Each connection can be frozen on its own ([`Proxy::freeze_existing`]:
//! flows alive now, while new ones go through), or all of them, new ones
//! included ([`Proxy::freeze_all`]). [`Proxy::thaw`] resumes everything;
//! bytes held meanwhile are forwarded then, in order.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One forwarded connection.
struct Flow {
    /// The address of the proxy's own socket to the server, as the server
    /// sees its client (`CLIENT LIST`'s `addr=`).
    upstream_local: SocketAddr,
    frozen: watch::Sender<bool>,
}

#[derive(Default)]
struct Shared {
    flows: Vec<Flow>,
    /// New connections start frozen.
    freeze_new: bool,
}

/// A running forwarder to one server; stops (and drops its connections) on drop.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    accept: JoinHandle<()>,
    flows: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    /// Starts forwarding a free loopback port to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let flows: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let (shared, flows) = (shared.clone(), flows.clone());
            async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else { continue };
                    let Ok(server) = TcpStream::connect(upstream).await else { continue };
                    let upstream_local = server.local_addr().unwrap();
                    let watch = {
                        let mut shared = shared.lock().unwrap();
                        let (tx, rx) = watch::channel(shared.freeze_new);
                        shared.flows.push(Flow { upstream_local, frozen: tx });
                        rx
                    };
                    let task = tokio::spawn(forward(client, server, watch));
                    flows.lock().unwrap().push(task);
                }
            }
        });
        Self { addr, shared, accept, flows }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `redis://` URL of the proxied server (no login).
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Freezes the connections open now for which `which` (given the
    /// address the server sees the connection come from) says so; new
    /// connections still go through.
    pub fn freeze_existing(&self, which: impl Fn(SocketAddr) -> bool) -> usize {
        let shared = self.shared.lock().unwrap();
        let mut frozen = 0;
        for flow in shared.flows.iter().filter(|f| which(f.upstream_local)) {
            flow.frozen.send_replace(true);
            frozen += 1;
        }
        frozen
    }

    /// Freezes every connection, and every new one from its start.
    pub fn freeze_all(&self) {
        let mut shared = self.shared.lock().unwrap();
        shared.freeze_new = true;
        for flow in &shared.flows {
            flow.frozen.send_replace(true);
        }
    }

    /// Resumes every connection, and lets new ones through.
    pub fn thaw(&self) {
        let mut shared = self.shared.lock().unwrap();
        shared.freeze_new = false;
        for flow in &shared.flows {
            flow.frozen.send_replace(false);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for task in self.flows.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// Forwards both ways until either side closes (then passes the close on),
/// pausing whenever `frozen` says so.
async fn forward(client: TcpStream, server: TcpStream, frozen: watch::Receiver<bool>) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, frozen.clone());
    let down = pump(server_read, client_write, frozen);
    // Each direction ends on its own: a half-close is passed on.
    tokio::join!(up, down);
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Nothing is read while frozen either: the sender's kernel buffers fill, as on a dead path.
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            // Frozen meanwhile: stop reading (a cancelled read loses nothing).
            _ = frozen.wait_for(|f| *f) => continue,
        };
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    // The source closed: pass it on once not frozen (a frozen path carries no FIN either).
    if frozen.wait_for(|f| !*f).await.is_ok() {
        let _ = to.shutdown().await;
    }
}
