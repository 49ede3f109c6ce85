//! The listener: connections bounded in number, header timeouts, graceful drain.

use crate::app::App;
use crate::routes;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting,
/// answers 503 to new requests on open connections, lets in-flight requests
/// finish (up to `limits.drain_timeout`) and returns.
pub async fn serve(app: Arc<App>, listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(app.limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        // At the connection limit, new connections wait in the kernel's backlog
        // instead of being dropped.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let header_timeout = app.limits.header_timeout;
        let app = app.clone();
        let service = hyper::service::service_fn(move |req| {
            let app = app.clone();
            async move { Ok::<_, std::convert::Infallible>(routes::handle(app, req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection ended: {e}");
            }
            drop(permit);
        });
    }
    app.draining.store(true, Ordering::SeqCst);
    drop(listener);
    tracing::info!("draining: waiting for in-flight requests");
    if tokio::time::timeout(app.limits.drain_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!("drain timeout: closing the remaining connections");
    }
    app.engine.shutdown();
}
