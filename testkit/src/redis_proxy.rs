//! A TCP proxy in front of Redis that a test can cut, stall and restore.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TCP proxy in front of the real Redis that a test can cut (every
/// connection dropped, new ones refused) and restore: Redis unreachable, and back.
/// It can also stall the connections it carries: they stay open but carry
/// nothing more, like a connection whose peer vanished without a reset;
/// black-hole Redis: stall them, and accept new ones that never get an
/// answer; slow every connection down to a bandwidth (a congested link); and
/// send new connections to another server (a failover behind one address).
pub struct RedisProxy {
    pub url: String,
    up: Arc<AtomicBool>,
    black_hole: Arc<AtomicBool>,
    /// Bytes a second each connection carries each way; 0: as fast as it can.
    bandwidth: Arc<AtomicU64>,
    target: Arc<std::sync::Mutex<String>>,
    cut: tokio::sync::broadcast::Sender<()>,
    stall: tokio::sync::broadcast::Sender<()>,
}

impl RedisProxy {
    pub async fn start(redis_url: &str) -> Self {
        let target = Arc::new(std::sync::Mutex::new(address_of(redis_url)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        let up = Arc::new(AtomicBool::new(true));
        let black_hole = Arc::new(AtomicBool::new(false));
        let bandwidth = Arc::new(AtomicU64::new(0));
        let (cut, _) = tokio::sync::broadcast::channel::<()>(1);
        let (stall, _) = tokio::sync::broadcast::channel::<()>(1);
        let (accepting, swallowing, cuts, stalls) = (up.clone(), black_hole.clone(), cut.clone(), stall.clone());
        let (targets, limit) = (target.clone(), bandwidth.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !accepting.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused, as far as the client can tell
                }
                let (mut cut, mut stall) = (cuts.subscribe(), stalls.subscribe());
                if swallowing.load(Ordering::SeqCst) {
                    // Accepted, and never answered, until a cut.
                    tokio::spawn(async move {
                        let _ = cut.recv().await;
                        drop(client);
                    });
                    continue;
                }
                let (target, limit) = (targets.lock().unwrap().clone(), limit.clone());
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let stalled = {
                        let (mut client_read, mut client_write) = client.split();
                        let (mut server_read, mut server_write) = server.split();
                        let carry = async {
                            tokio::join!(
                                pump(&mut client_read, &mut server_write, &limit),
                                pump(&mut server_read, &mut client_write, &limit),
                            )
                        };
                        tokio::select! {
                            _ = carry => false,
                            _ = cut.recv() => false,
                            _ = stall.recv() => true,
                        }
                    };
                    if stalled {
                        // Both sockets stay open, and nothing moves, until a cut.
                        let _ = cut.recv().await;
                    }
                });
            }
        });
        Self {
            url,
            up,
            black_hole,
            bandwidth,
            target,
            cut,
            stall,
        }
    }

    /// The connections open now carry nothing more (new ones work).
    pub fn stall(&self) {
        let _ = self.stall.send(());
    }

    /// Redis stops answering: the connections open now stall, and new ones
    /// are accepted but never answered, until a cut (then `restore`).
    pub fn black_hole(&self) {
        self.black_hole.store(true, Ordering::SeqCst);
        self.stall();
    }

    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        let _ = self.cut.send(());
    }

    /// New connections reach Redis again.
    pub fn restore(&self) {
        self.black_hole.store(false, Ordering::SeqCst);
        self.up.store(true, Ordering::SeqCst);
    }

    /// Every connection, open or new, carries at most `bytes_per_second`
    /// each way (`None`: no limit).
    pub fn limit_bandwidth(&self, bytes_per_second: Option<u64>) {
        self.bandwidth.store(bytes_per_second.unwrap_or(0), Ordering::SeqCst);
    }

    /// New connections go to the Redis at `redis_url` (open ones are not moved).
    pub fn send_to(&self, redis_url: &str) {
        *self.target.lock().unwrap() = address_of(redis_url);
    }
}

/// `host:port` of a `redis://host:port` URL.
pub(crate) fn address_of(redis_url: &str) -> String {
    redis_url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_string()
}

/// Copies `from` to `to` until either closes, at most `limit` bytes a second (0: no limit).
pub(crate) async fn pump(
    from: &mut (impl tokio::io::AsyncRead + Unpin),
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    limit: &AtomicU64,
) {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        let bytes_per_second = limit.load(Ordering::SeqCst);
        if bytes_per_second > 0 {
            tokio::time::sleep(Duration::from_secs_f64(read as f64 / bytes_per_second as f64)).await;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
