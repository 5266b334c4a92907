//! llmgate's `Proxy` service alone, served with hyper: no auth, no usage, no router.
//! The benchmark (`bench/run.sh`) runs it to separate what the Rust HTTP stack costs
//! from what authentication and usage accounting add.
//!
//! ```text
//! cargo run --release -p llmgate-examples --bin bare_proxy -- 127.0.0.1:8081 http://127.0.0.1:8000
//! ```

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use llmgate_core::proxy::{Proxy, ProxyConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: bare_proxy LISTEN_ADDR UPSTREAM_URL");
        std::process::exit(2);
    };
    let proxy = Proxy::new(ProxyConfig::new(upstream.parse()?))?;
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("bare proxy listening on http://{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(proxy.clone());
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
