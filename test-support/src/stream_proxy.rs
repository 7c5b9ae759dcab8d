//! nginx's `stream {}` module: a TCP proxy in a site's config, beside its HTTP server.

use std::net::SocketAddr;
use std::path::Path;

use crate::{Site, free_port};

/// Debian's build of the module (libnginx-mod-stream).
pub const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

impl Site {
    /// Adds a `stream {}` TCP proxy to `backend` on a port of its own; returns its address.
    /// Call it before nginx starts.
    pub fn add_stream_proxy(&self, backend: u16) -> SocketAddr {
        assert!(
            Path::new(STREAM_MODULE).exists(),
            "{STREAM_MODULE} is missing: install libnginx-mod-stream (scripts/install-deps.sh)"
        );
        let port = free_port();
        let config = std::fs::read_to_string(&self.config).unwrap();
        let config = format!(
            "load_module {STREAM_MODULE};\n{config}\
             stream {{\n    server {{ listen 127.0.0.1:{port}; proxy_pass 127.0.0.1:{backend}; }}\n}}\n"
        );
        std::fs::write(&self.config, config).unwrap();
        SocketAddr::from(([127, 0, 0, 1], port))
    }
}
