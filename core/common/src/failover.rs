//! A connection to one server, or to the first of several heads that answers.
//!
//! A cluster may run a standby head beside its active one (both on one Redis storage;
//! the standby listens only once it holds the head lease). Whoever talks to "the head"
//! is given every head's address, `host:port,host:port`, and follows the active one: a
//! call goes to the head that answered last; a call that fails in transport (refused,
//! reset: that head is down or standing by) moves the next call to the next address,
//! and the caller asks again as it does after any `Unavailable`. No probing, no
//! waiting: a caller never hangs on a list whose heads are all down.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::transport::Channel;
use tower_service::Service;

/// The error of a call on a [`ClusterChannel`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One server's channel, or the heads of a cluster in turn.
#[derive(Clone, Debug)]
pub enum ClusterChannel {
    One(Channel),
    Heads(Heads),
}

/// Channels to every head, and which one calls go to now.
#[derive(Clone, Debug)]
pub struct Heads {
    channels: Arc<[Channel]>,
    current: Arc<AtomicUsize>,
}

impl Heads {
    /// `channels` in the order given; calls start at `first`.
    pub fn new(channels: Vec<Channel>, first: usize) -> Self {
        let first = if channels.is_empty() { 0 } else { first % channels.len() };
        Heads { channels: channels.into(), current: Arc::new(AtomicUsize::new(first)) }
    }

    /// Which head calls go to now (an index into the list).
    pub fn current(&self) -> usize {
        self.current.load(Ordering::SeqCst)
    }
}

impl From<Channel> for ClusterChannel {
    fn from(channel: Channel) -> Self {
        ClusterChannel::One(channel)
    }
}

/// The addresses of a head list (`a,b`), trimmed, empty ones left out.
pub fn addresses(list: &str) -> Vec<&str> {
    list.split(',').map(str::trim).filter(|address| !address.is_empty()).collect()
}

/// A head list with one scheme for all: when any head is named `https://`, every one is
/// (the heads of one cluster all speak TLS or none do; a head dialled in plaintext would
/// see the caller's credential). A list naming both `http://` and `https://` is refused.
pub fn one_scheme(list: &str) -> Result<String, String> {
    let heads = addresses(list);
    let tls = heads.iter().any(|head| head.starts_with("https://"));
    if tls && heads.iter().any(|head| head.starts_with("http://")) {
        return Err(format!("the heads {list:?} mix http:// and https://: a cluster's heads all speak TLS or none"));
    }
    if !tls {
        return Ok(heads.join(","));
    }
    let named: Vec<String> = heads
        .iter()
        .map(|head| if head.starts_with("https://") { head.to_string() } else { format!("https://{head}") })
        .collect();
    Ok(named.join(","))
}

pub enum ClusterFuture {
    One(tonic::transport::channel::ResponseFuture),
    Heads(Pin<Box<dyn Future<Output = Result<http::Response<Body>, BoxError>> + Send>>),
}

impl Future for ClusterFuture {
    type Output = Result<http::Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            ClusterFuture::One(future) => Pin::new(future).poll(cx).map_err(Into::into),
            ClusterFuture::Heads(future) => future.as_mut().poll(cx),
        }
    }
}

impl Service<http::Request<Body>> for ClusterChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = ClusterFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self {
            ClusterChannel::One(channel) => channel.poll_ready(cx).map_err(Into::into),
            // Each call readies the head it goes to.
            ClusterChannel::Heads(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        match self {
            ClusterChannel::One(channel) => ClusterFuture::One(channel.call(request)),
            ClusterChannel::Heads(heads) => {
                let index = heads.current();
                let mut channel = heads.channels[index].clone();
                let current = heads.current.clone();
                let count = heads.channels.len();
                ClusterFuture::Heads(Box::pin(async move {
                    let result = async {
                        std::future::poll_fn(|cx| channel.poll_ready(cx)).await?;
                        channel.call(request).await
                    }
                    .await;
                    if result.is_err() {
                        // That head is down or standing by: the next call tries the next.
                        let _ =
                            current.compare_exchange(index, (index + 1) % count, Ordering::SeqCst, Ordering::SeqCst);
                    }
                    result.map_err(Into::into)
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_lists_are_split_and_trimmed() {
        assert_eq!(addresses("a:1, b:2,,"), vec!["a:1", "b:2"]);
        assert_eq!(addresses("a:1"), vec!["a:1"]);
    }

    #[test]
    fn every_head_of_a_tls_list_speaks_tls() {
        assert_eq!(one_scheme("https://a:1,b:2").unwrap(), "https://a:1,https://b:2");
        assert_eq!(one_scheme("a:1, b:2").unwrap(), "a:1,b:2");
        assert!(one_scheme("https://a:1,http://b:2").unwrap_err().contains("mix"));
    }
}
