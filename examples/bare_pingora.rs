//! A bare Pingora reverse proxy: only `upstream_peer`, one worker thread. It is a measuring
//! instrument for `load-tests/run.sh` (the floor of the gateway's own design), not part of the
//! product.
//!
//!   cargo build --release --example bare_pingora
//!   target/release/examples/bare_pingora 127.0.0.1:18087 127.0.0.1:18090 [--timeouts]
//!
//! `--timeouts` gives the upstream peer the gateway's default timeouts (connect 2 s, connect +
//! TLS 7 s, read and write 30 s, idle 60 s): Pingora then arms its timers on every upstream
//! read and write, as it does for the gateway, which must never wait on a server forever.

use async_trait::async_trait;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::Result;
use pingora_proxy::{ProxyHttp, Session};
use std::time::Duration;

struct Bare {
    upstream: String,
    timeouts: bool,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(self.upstream.as_str(), false, String::new());
        if self.timeouts {
            let o = &mut peer.options;
            o.connection_timeout = Some(Duration::from_secs(2));
            o.total_connection_timeout = Some(Duration::from_secs(7));
            o.read_timeout = Some(Duration::from_secs(30));
            o.write_timeout = Some(Duration::from_secs(30));
            o.idle_timeout = Some(Duration::from_secs(60));
        }
        Ok(Box::new(peer))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let timeouts = args.iter().any(|a| a == "--timeouts");
    let mut addrs = args.into_iter().filter(|a| !a.starts_with("--"));
    let (Some(listen), Some(upstream)) = (addrs.next(), addrs.next()) else {
        eprintln!("usage: bare_pingora LISTEN_ADDR UPSTREAM_ADDR [--timeouts]");
        std::process::exit(2);
    };
    let conf = ServerConf {
        threads: 1,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy =
        pingora_proxy::http_proxy_service(&server.configuration, Bare { upstream, timeouts });
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.run_forever();
}
