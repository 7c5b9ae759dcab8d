//! `soak`: load an HTTP server the way a person's curl loop would, but exactly: no request is
//! retried, every failure is classified ([`classify`]), and the report says when each happened.
//! `rehearse` drives the same load ([`client`]) through its Service imitation.

pub mod classify;
pub mod client;
pub mod first_field;
pub mod mix;
pub mod report;
pub mod tls;

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::cli::SoakArgs;
use crate::error::{Error, exit};
use client::{Load, Progress, Reuse};
use mix::PathMix;
use tls::{Tls, Trust};

/// Without --duration or --requests a soak runs this long; with only --requests, at most
/// [`REQUESTS_TIME_LIMIT`].
pub const DEFAULT_DURATION: Duration = Duration::from_secs(10);
pub const REQUESTS_TIME_LIMIT: Duration = Duration::from_secs(3600);

pub async fn run(args: SoakArgs) -> Result<i32, Error> {
    let load = Arc::new(load_from(&args).await?);
    let progress = Arc::new(Progress::default());
    let show_progress = !args.json && std::io::stderr().is_terminal();
    let start = Instant::now();
    let live = show_progress.then(|| tokio::spawn(progress_line(progress.clone(), start)));
    let interrupt = {
        let progress = progress.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                progress.stop();
            }
        })
    };
    let records = client::run(load.clone(), start, progress).await;
    let elapsed = start.elapsed();
    interrupt.abort();
    if let Some(live) = live {
        live.abort();
        eprint!("\r\x1b[2K");
    }
    let summary = report::summarize(&records, elapsed, Duration::ZERO);
    if let Some(path) = &args.timeline {
        std::fs::write(path, report::timeline_csv(&records, &load.paths, Duration::ZERO))
            .map_err(Error::internal("cannot write the timeline file"))?;
    }
    if args.json {
        println!("{}", summary.to_json());
    } else {
        let mode = load.reuse.describe();
        println!("soak {} ({} connections, {mode})", args.url, load.concurrency);
        print!("{}", summary.to_text("the start"));
    }
    Ok(if summary.failed > 0 {
        exit::REQUESTS_FAILED
    } else {
        exit::OK
    })
}

async fn load_from(args: &SoakArgs) -> Result<Load, Error> {
    let target = Target::parse(&args.url).await?;
    let tls = match &target.tls_name {
        None => None,
        Some(name) => {
            let trust = match (&args.cacert, args.insecure) {
                (Some(file), _) => Trust::CaFile(file),
                (None, true) => Trust::Insecure,
                (None, false) => Trust::System,
            };
            let tls = Tls::new(name, trust).map_err(|detail| Error::BadTarget {
                url: args.url.clone(),
                detail,
            })?;
            Some(tls)
        }
    };
    Ok(Load {
        addr: target.addr,
        host: target.host,
        paths: args
            .path_mix
            .clone()
            .unwrap_or_else(|| PathMix::single(&target.path)),
        concurrency: args.concurrency.max(1),
        reuse: match (args.no_keepalive, args.first_field) {
            (true, _) => Reuse::Never,
            (false, true) => Reuse::FirstField,
            (false, false) => Reuse::KeepAlive,
        },
        rate: args.rate.filter(|r| *r > 0.0),
        requests: args.requests,
        duration: match (args.duration, args.requests) {
            (Some(d), _) => d,
            (None, Some(_)) => REQUESTS_TIME_LIMIT,
            (None, None) => DEFAULT_DURATION,
        },
        connect_timeout: args.connect_timeout,
        response_timeout: args.timeout,
        tls,
        bind_first: false,
    })
}

/// Where a URL points: the address to connect to, the Host header, the path.
pub struct Target {
    pub addr: std::net::SocketAddr,
    pub host: String,
    pub path: String,
    /// For https: the host name for SNI and the certificate.
    pub tls_name: Option<String>,
}

impl Target {
    pub async fn parse(url: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::BadTarget {
            url: url.to_owned(),
            detail: why.to_owned(),
        };
        let uri: hyper::Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(bad(
                    "soak speaks HTTP/1.1, plain or over TLS: give an http:// or https:// URL",
                ));
            }
        };
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let addr = tokio::net::lookup_host((authority.host(), port))
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| bad("the host does not resolve"))?;
        Ok(Self {
            addr,
            host: authority.as_str().to_owned(),
            path: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
            tls_name: tls.then(|| authority.host().to_owned()),
        })
    }
}

/// One line on the terminal, redrawn four times a second: requests, rate, failures so far.
async fn progress_line(progress: Arc<Progress>, start: Instant) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let requests = progress.requests.load(Ordering::Relaxed);
        let failures = progress.failures.load(Ordering::Relaxed);
        let elapsed = start.elapsed().as_secs_f64();
        eprint!(
            "\r\x1b[2K{elapsed:>5.1} s  {requests:>9} requests  {:>7.0}/s  {failures} failed",
            requests as f64 / elapsed.max(1e-3)
        );
    }
}
