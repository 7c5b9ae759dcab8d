//! The kubelet's readiness probe of one pod, for `--topology local`: an HTTP GET every
//! `--probe-period` (a timer, as the kubelet's is), passing on 200 to 399 within the probe's
//! timeout, with failureThreshold and successThreshold 1, and probing on through the
//! termination (the kubelet does since KEP-1669). Each change goes to the pod's endpoint.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::time::MissedTickBehavior;

use super::strategy::Preset;
use crate::soak::client::probe;
use crate::soak::tls::Tls;

/// What the kubelet GETs.
#[derive(Debug, Clone)]
pub struct Probe {
    pub addr: SocketAddr,
    pub path: &'static str,
    pub tls: Option<Tls>,
}

impl Probe {
    /// nginx-graceful's pods are probed on its /readyz; the recipes', which have no health
    /// listener, on nginx's own `/` (the probe their manifests carry).
    pub fn of(preset: Preset, listen: SocketAddr, health: SocketAddr, tls: Option<&Tls>) -> Probe {
        match preset {
            Preset::NginxGraceful => Probe {
                addr: health,
                path: "/readyz",
                tls: None,
            },
            _ => Probe {
                addr: listen,
                path: "/",
                tls: tls.cloned(),
            },
        }
    }

    /// One probe: passed or failed. The timeout is the kubelet's default (1 s), or the period
    /// when that is shorter, so that probes never overlap.
    pub async fn passes(&self, period: Duration) -> bool {
        let timeout = period.min(Duration::from_secs(1));
        probe(self.addr, self.path, self.tls.clone(), timeout)
            .await
            .is_ok_and(|status| (200..400).contains(&status))
    }
}

/// When to probe first, from `start` on, so that the probes fall half a period off `t0` (the
/// termination's start): a readiness that fails at `t0` is seen half a period later, the mean
/// over the phases a kubelet takes (it starts each prober at a random point of the period).
pub fn first_probe(start: Instant, t0: Instant, period: Duration) -> Instant {
    let half = t0 + period / 2;
    if half <= start || period.is_zero() {
        return start;
    }
    let periods_before = (half - start).as_nanos() / period.as_nanos();
    half - period * periods_before as u32
}

/// Probes every `period` from `first` until `until`, from a pod that passed (it was waited
/// for to serve); `changed` hears each change of the result.
pub async fn watch(probe: Probe, first: Instant, period: Duration, until: Instant, changed: impl Fn(bool)) {
    let mut ticks = tokio::time::interval_at(first.into(), period.max(Duration::from_millis(10)));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut serving = true;
    while Instant::now() < until {
        ticks.tick().await;
        let passed = probe.passes(period).await;
        if passed != serving {
            serving = passed;
            changed(serving);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[test]
    fn nginx_graceful_is_probed_on_readyz_the_recipes_on_nginx() {
        let listen: SocketAddr = "127.0.0.11:80".parse().unwrap();
        let health: SocketAddr = "127.0.0.11:81".parse().unwrap();
        let graceful = Probe::of(Preset::NginxGraceful, listen, health, None);
        assert_eq!((graceful.addr, graceful.path), (health, "/readyz"));
        for preset in [Preset::Naive, Preset::Tini, Preset::Custom] {
            let recipe = Probe::of(preset, listen, health, None);
            assert_eq!((recipe.addr, recipe.path), (listen, "/"));
        }
    }

    #[test]
    fn probes_fall_half_a_period_off_the_termination() {
        let start = Instant::now();
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        let cases = [
            (s(2), s(1), ms(500)),
            (ms(2300), s(1), ms(800)),
            (s(2), s(10), s(7)),
            (s(0), s(1), ms(500)),
            (s(1), ms(0), s(0)),
        ];
        for (t0, period, expected) in cases {
            assert_eq!(
                first_probe(start, start + t0, period) - start,
                expected,
                "{t0:?} {period:?}"
            );
        }
    }

    /// A server that answers 200 to its first `ok` requests and 503 after them.
    async fn readiness_server(ok: usize) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for served in 0..100 {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let status = if served < ok {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                let response = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = stream.write_all(response.as_bytes()).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_failing_probe_is_heard_once_within_a_period() {
        let addr = readiness_server(2).await;
        let heard = Arc::new(Mutex::new(Vec::new()));
        let log = heard.clone();
        let probe = Probe {
            addr,
            path: "/readyz",
            tls: None,
        };
        let start = Instant::now();
        let until = start + Duration::from_millis(300);
        watch(probe, start, Duration::from_millis(50), until, move |s| {
            log.lock().unwrap().push((s, start.elapsed()))
        })
        .await;
        let heard = heard.lock().unwrap().clone();
        assert_eq!(
            heard.iter().map(|h| h.0).collect::<Vec<_>>(),
            [false],
            "{heard:?}"
        );
        // The third probe fails: at 100 ms, give or take the scheduler.
        assert!(heard[0].1 < Duration::from_millis(250), "{heard:?}");
    }
}
